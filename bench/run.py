"""Side-by-side speed of i2v on this machine: end to end, model only, a naive PyTorch baseline, ONNX Runtime.

Builds full-size tag and feature networks (the release's layer widths, random weights: speed does not depend
on their values) as safetensors with i2v's own functions, a deterministic folder of mixed-size JPEG/PNG
illustrations, then measures everything in one run and prints img/s, ratios and peak RSS. Each row runs in a
process of its own so that its peak RSS is its own. Model-only rows alternate round by round and report the
median, so a noisy neighbour slows every row alike.

    .venv/bin/pip install -e '.[onnx]' && .venv/bin/python bench/run.py          # full run, under 10 minutes
    .venv/bin/python bench/run.py --quick                                          # a smoke run, about 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
BATCH = 8
#: Version of the synthetic full-size models (part of their file names): he = He-initialised, scaled head.
MODEL_VERSION = "he1"
#: (width, height) of the synthetic illustrations, cycled: thumbnails to phone and 2K scans.
SIZES = [(224, 224), (512, 512), (600, 800), (768, 1024), (1024, 768), (1200, 900), (850, 1200), (1920, 1080)]


# --------------------------------------------------------------------------------------------------------
# Inputs


def build_models() -> dict[str, Path]:
    """Full-size tag and feature models with random weights, written once as i2v safetensors files.

    He-initialised convolutions (the signal keeps its size through the 11 layers) and a head scaled so that
    the logits spread over about N(0, 2) around random per-output offsets: with PyTorch's default
    initialisation every score would sit within 1e-3 of 0.5, which says nothing about int8's accuracy."""
    import torch

    from i2v_cli.config import FEATURE, RELEASE_FEATURE_DIM, RELEASE_WIDTHS, TAG
    from i2v_cli.model import Architecture, Illust2VecNet
    from i2v_cli.quantize import synthetic_images
    from i2v_cli.transform import to_network_input
    from i2v_cli.weights import WeightsInfo, save_safetensors

    paths = {}
    for kind, dim in ((TAG, 0), (FEATURE, RELEASE_FEATURE_DIM)):
        path = OUT / "models" / f"{kind}-{MODEL_VERSION}.safetensors"
        paths[kind] = path
        if path.is_file():
            continue
        gen = torch.Generator().manual_seed(0)
        model = Illust2VecNet(Architecture(kind, RELEASE_WIDTHS, dim))
        with torch.no_grad():
            for conv in [m for m in model.features if isinstance(m, torch.nn.Conv2d)]:
                fan_in = conv.weight[0].numel()
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.1)
            head = model.conv6_4 if kind == TAG else model.encode1
            images = torch.stack([to_network_input(torch.from_numpy(a)) for a in synthetic_images(16, seed=1)])
            logits = model.forward_head(model.forward_features(images))
            scale = 2.0 / float(logits.std())
            offset = torch.randn(logits.shape[1], generator=gen) - scale * logits.mean(0)
            head.weight.mul_(scale)
            head.bias.mul_(scale).add_(offset)
        info = WeightsInfo(kind, RELEASE_WIDTHS, dim, 1539, f"bench-{kind}", f"bench-{MODEL_VERSION}-{kind}", "bench")
        save_safetensors(model.state_dict(), path, info.to_metadata())
        del model
    return paths


def build_images(n: int) -> Path:
    """``n`` deterministic illustrations: gradients, shapes and lines; JPEG and PNG; sizes from SIZES."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder = OUT / f"images-{n}"
    if folder.is_dir() and len(list(folder.iterdir())) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, h)[:, None, None]
        base = np.broadcast_to((top * (1 - t) + bottom * t).astype(np.uint8), (h, w, 3))
        img = Image.fromarray(np.ascontiguousarray(base))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
            draw.line((x0, y1, x1, y0), fill=(0, 0, 0), width=3)
        if i % 3 == 2:
            img.save(folder / f"img{i:04d}.png", optimize=False)
        else:
            img.save(folder / f"img{i:04d}.jpg", quality=90)
    return folder


# --------------------------------------------------------------------------------------------------------
# Measurements, each run in a child process (``--child NAME``); they print one JSON line


def _load(kind: str):
    """A fresh copy of a bench model (each row gets its own: some preparations convert a model in place)."""
    from i2v_cli.weights import load_model

    model, _ = load_model(OUT / "models" / f"{kind}-{MODEL_VERSION}.safetensors", kind=kind)
    return model


def _plain_onnx(kind: str, model) -> Path:
    """The whole network exported as anyone would, once: what the plain ONNX Runtime and OpenVINO rows run."""
    from i2v_cli.inference import export_onnx

    path = OUT / "cache" / f"plain-{kind}-{MODEL_VERSION}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(model, path)
    return path


def _openvino(path: Path, hint: str | None = None):
    """An OpenVINO CPU model (2 threads... as many as torch uses, latency mode) as a numpy-in, numpy-out callable."""
    import openvino as ov
    import torch

    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    if hint:
        config["INFERENCE_PRECISION_HINT"] = hint
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda x: request.infer({0: x})[0]


def _torch_int8(model):
    """PyTorch's own int8 (FX graph mode, x86 backend: fbgemm/oneDNN), default qconfig, calibrated on the same
    calibration set: the candidate that needs nothing beyond torch."""
    import warnings

    import torch
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from i2v_cli import quantize

    class Features(torch.nn.Module):  # conv1_1 ... conv6_3 alone: what FX quantises; the head stays in fp32
        def __init__(self) -> None:
            super().__init__()
            self.features = model.features

        def forward(self, x):
            return self.features(x)

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FX quantisation's deprecation notes
        trunk = Features().eval()
        prepared = prepare_fx(trunk, get_default_qconfig_mapping("x86"), (torch.zeros(1, 3, 224, 224),))
        with torch.inference_mode():
            inputs = quantize.network_inputs(quantize.find_calibration().images())
            for i in range(0, len(inputs), 8):
                prepared(inputs[i : i + 8])
        quantized = convert_fx(prepared)
    if model.arch.kind == "tag":
        return lambda x: torch.sigmoid(model.forward_head(quantized(x)))
    return lambda x: model.forward_head(quantized(x))


def _predictors(kind: str, names: list[str]) -> dict:
    """Callables for the model-only rows: eager NCHW (naive), i2v (default, torch, bf16, int8), ONNX Runtime,
    and the other int8 candidates: OpenVINO (fp32, and on i2v's int8 QDQ file), PyTorch's FX int8."""
    import torch

    from i2v_cli.inference import prepare_for_inference

    out = {}
    for name in names:
        model = _load(kind)
        if name == "naive":
            out[name] = model
        elif name == "i2v":
            out[name] = prepare_for_inference(model, cache_dir=OUT / "cache")
        elif name == "i2v-torch":
            out[name] = prepare_for_inference(model, backend="torch")
        elif name == "i2v-bf16":
            out[name] = prepare_for_inference(model, precision="bf16")
        elif name in ("i2v-int8", "ov-int8"):  # the same int8 file, in ONNX Runtime or OpenVINO
            from i2v_cli.quantize import Int8Net

            runtime = "onnxruntime" if name == "i2v-int8" else "openvino"
            out[name] = Int8Net(model, cache_dir=OUT / "cache", runtime=runtime)
        elif name == "ort":  # a plain session, default options: the reference runtime as anyone would use it
            import onnxruntime as ort

            session = ort.InferenceSession(str(_plain_onnx(kind, model)), providers=["CPUExecutionProvider"])
            out[name] = lambda x, s=session: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
        elif name == "ov-fp32":
            run = _openvino(_plain_onnx(kind, model), "f32")
            out[name] = lambda x, run=run: torch.from_numpy(run(x.numpy()))
        elif name == "torch-int8":
            out[name] = _torch_int8(model)
        else:
            raise SystemExit(f"unknown row {name!r}")
    return out


def openvino_available() -> bool:
    """Whether OpenVINO is installed (the optional ``openvino`` extra): its rows are skipped otherwise."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def child_accuracy(kind: str, names: list[str], folder: str, limit: int) -> dict:
    """Agreement with eager fp32 of each predictor on the benchmark's images: decisions at 0.5 (tag) or signs
    of encode1 (feature) unchanged, and the largest difference (absolute, or relative to the largest |feature|)."""
    import numpy as np
    import torch

    from i2v_cli.transform import load_and_preprocess

    files = sorted(Path(folder).iterdir())[:limit]
    x = torch.stack([load_and_preprocess(f) for f in files])
    preds = _predictors(kind, ["naive", *names])
    with torch.inference_mode():
        outs = {
            n: np.concatenate([p(x[i : i + BATCH]).float().numpy() for i in range(0, len(x), BATCH)])
            for n, p in preds.items()
        }
    ref = outs.pop("naive")
    threshold, scale = (0.5, 1.0) if kind == "tag" else (0.0, float(np.abs(ref).max()))
    return {
        n: {
            "agreement": float(((y > threshold) == (ref > threshold)).mean()),
            "max_diff": float(np.abs(y - ref).max() / scale),
        }
        for n, y in outs.items()
    }


def child_model_only(kind: str, names: list[str], rounds: int, batches: int) -> dict:
    """img/s of each predictor on the same (8, 3, 224, 224) batches, alternating round by round."""
    import torch

    preds = _predictors(kind, names)
    x = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
    rates: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # CPU seconds per image, all threads of the process
    with torch.inference_mode():
        ref = preds[names[0]](x).float()
        diffs = {n: float((p(x).float() - ref).abs().max()) for n, p in preds.items()}
        for _ in range(rounds):
            for n, p in preds.items():
                t, c = time.perf_counter(), time.process_time()
                for _ in range(batches):
                    p(x)
                rates[n].append(BATCH * batches / (time.perf_counter() - t))
                cpu[n].append((time.process_time() - c) / (BATCH * batches))
    return {"rates": rates, "cpu": cpu, "maxdiff_vs_first": diffs}


def child_naive_e2e(folder: str, limit: int) -> dict:
    """The naive pipeline: per image PIL decode + PIL bilinear resize, eager NCHW, batches of 8, one process."""
    import numpy as np
    import torch
    from PIL import Image

    model = _load("tag")
    mean = torch.tensor([164.76139251, 167.47864617, 181.13838569]).view(3, 1, 1)
    files = sorted(Path(folder).iterdir())[:limit]
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), BATCH):
            xs = []
            for f in files[i : i + BATCH]:
                img = Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)
                arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1).flip(0)
                xs.append(arr - mean)
            model(torch.stack(xs))
    return {"images": len(files), "seconds": time.perf_counter() - t}


def child_resize(folder: str) -> dict:
    """Milliseconds per megapixel of i2v's exact resize (and of decoding), over the folder's sizes."""
    from i2v_cli.decode import image_to_array, open_image
    from i2v_cli.transform import resize_like_caffe

    files = sorted(Path(folder).iterdir())[: len(SIZES) * 2]
    import numpy as np

    resize_like_caffe(np.zeros((8, 8, 3), np.uint8))  # its first call imports torch (the tensor it returns): not timed
    decode = resize = mp = 0.0
    for f in files:
        t0 = time.perf_counter()
        arr = image_to_array(open_image(f))
        t1 = time.perf_counter()
        resize_like_caffe(arr)
        resize += time.perf_counter() - t1
        decode += t1 - t0
        mp += arr.shape[0] * arr.shape[1] / 1e6
    return {"resize_ms_per_mp": 1000 * resize / mp, "decode_ms_per_mp": 1000 * decode / mp, "megapixels": mp}


def child_stages(folder: str, limit: int) -> dict:
    """Where the CPU time of `i2v tag` goes, stage by stage, in one thread (CPU seconds per image): decoding,
    the exact resize, normalising, the hand-over of a batch from a worker (pickling its array), the network
    (ONNX Runtime, its own threads included: process CPU time), records and the JSONL writer. On a machine whose
    cores the network fills, end to end can reach at most network / (network + the rest) of model-only speed."""
    import pickle

    import torch

    from i2v_cli.data import Sample, collate
    from i2v_cli.decode import RGBPixels, open_image
    from i2v_cli.inference import prepare_for_inference
    from i2v_cli.pipeline import TagRecords
    from i2v_cli.runner import map_batch
    from i2v_cli.tags import Selection, load_tag_list
    from i2v_cli.transform import network_input_array, resize_array
    from i2v_cli.writers import open_writer

    files = [str(f) for f in sorted(Path(folder).iterdir())[:limit]]
    net = prepare_for_inference(_load("tag"), cache_dir=OUT / "cache")
    records = TagRecords(load_tag_list(None), Selection.make(None))
    writer = open_writer("jsonl", os.devnull)
    cpu = dict.fromkeys(["decode", "resize", "normalise", "hand-over", "network", "records", "writer"], 0.0)
    torch.set_num_threads(1)  # the decoding stages as in a worker; the network's threads are ORT's own
    for start in range(0, len(files), BATCH):
        batch_files = files[start : start + BATCH]
        samples = []
        for i, f in enumerate(batch_files):
            t0 = time.thread_time()
            pixels = RGBPixels(open_image(f))
            t1 = time.thread_time()
            rgb = resize_array(pixels)
            t2 = time.thread_time()
            x = torch.from_numpy(network_input_array(rgb))
            t3 = time.thread_time()
            cpu["decode"] += t1 - t0
            cpu["resize"] += t2 - t1
            cpu["normalise"] += t3 - t2
            samples.append(Sample(start + i, x, None))
        t0 = time.thread_time()
        batch = collate(samples)  # in the worker, then through the pipe to the reader thread
        batch = pickle.loads(pickle.dumps(batch))
        batch.inputs = torch.as_tensor(batch.inputs)
        cpu["hand-over"] += time.thread_time() - t0
        t1 = time.process_time()  # the network's threads (this one is one of them) all count
        results = map_batch(net, files, batch, torch.device("cpu"))
        t2 = time.process_time()
        t3 = time.thread_time()
        recs = records(results)
        t4 = time.thread_time()
        writer.write(recs)
        t5 = time.thread_time()
        cpu["network"] += t2 - t1
        cpu["records"] += t4 - t3
        cpu["writer"] += t5 - t4
    writer.close()
    return {"images": len(files), "cpu_ms_per_image": {k: 1000 * v / len(files) for k, v in cpu.items()}}


def _child(argv: list[str]) -> None:
    what = argv[0]
    if what == "setup":
        result = {"models": {k: str(v) for k, v in build_models().items()}, "folder": str(build_images(int(argv[1])))}
    elif what == "model":
        result = child_model_only(argv[1], argv[2].split(","), int(argv[3]), int(argv[4]))
    elif what == "accuracy":
        result = child_accuracy(argv[1], argv[2].split(","), argv[3], int(argv[4]))
    elif what == "naive-e2e":
        result = child_naive_e2e(argv[1], int(argv[2]))
    elif what == "stages":
        result = child_stages(argv[1], int(argv[2]))
    else:
        result = child_resize(argv[1])
    print(json.dumps(result))


def run_child(args: list[str], cmd: list[str] | None = None) -> tuple[dict, float, float]:
    """Run a child (this script with ``--child`` or a command); its JSON output, wall seconds and peak RSS (MB)."""
    cmd = cmd or [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t = time.perf_counter()
        # The i2v commands use the bench's cache (its ONNX exports and int8 files), not the user's.
        env = {**os.environ, "I2V_HOME": str(OUT / "cache")}
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True, env=env)
        # wait4 gives this child's own rusage: ru_maxrss is the largest of it and its waited-for descendants.
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    rss = usage.ru_maxrss / 1024
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines and args else {}), wall, rss


def run_cli(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, float]:
    """Run an i2v command (with ``env`` added to the environment; by default the bench's cache); its wall seconds
    and CPU seconds (its decoding workers included)."""
    env = {**os.environ, **(env if env is not None else {"I2V_HOME": str(OUT / "cache")})}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def doubled(folder: Path) -> Path:
    """``folder``'s images twice over (hard links under two prefixes): a run on it decodes the same mix of sizes
    and formats twice, so that its extra time over a run on ``folder`` is that mix's steady-state cost."""
    target = folder.with_name(folder.name + "x2")
    names = sorted(p.name for p in folder.iterdir())
    if target.is_dir() and len(list(target.iterdir())) == 2 * len(names):
        return target
    target.mkdir(exist_ok=True)
    for prefix in ("a-", "b-"):
        for name in names:
            link = target / (prefix + name)
            if not link.exists():
                os.link(folder / name, link)
    return target


def measure_e2e(i2v: str, folder: Path, weights: Path, n: int, rounds: int, precision: str, kind: str = "tag") -> dict:
    """`i2v tag` (or `i2v features`, ``kind`` "feature") end to end with its start-up taken out, against i2v's own
    model-only rate, round by round.

    Each round runs the model-only child (i2v's network, same batch size, n images), then `i2v tag` on the n
    images and on the same n twice over (:func:`doubled`). Both runs take the same path and pay the same start-up
    (imports, session, decoding workers, the first batches' warm-up), so the rate without it is
    n / (wall(2n) - wall(n)); the CPU seconds per image are taken the same way. (A one-image run, subtracted
    before, takes the torch-free path: it left torch's import and the workers' start in the "steady" rate.) The
    one-image run is still timed, as the start-up a user sees. Ratios are per round (neighbours slow both alike),
    reported as median and range."""
    one = sorted(folder.iterdir())[0]
    twice = doubled(folder)
    command, output = ("tag", "tags-e2e.jsonl") if kind == "tag" else ("features", "features-e2e.npy")
    base = [i2v, command, "-w", str(weights), "-o", str(OUT / output), "-b", str(BATCH), "--precision"]
    run_cli([*base, precision, str(one)])  # the caches (export, optimised graph, weights record) are warm
    name = "i2v" if precision == "fp32" else "i2v-int8"
    walls, ratios, cpu_ratios, rates, model_rates, cpu_img, net_cpu_img = [], [], [], [], [], [], []
    for _ in range(rounds):
        model, _, _ = run_child(["model", kind, name, "1", str(max(1, n // BATCH))])
        w1, _ = run_cli([*base, precision, str(one)])
        wn, cn = run_cli([*base, precision, str(folder)])
        w2n, c2n = run_cli([*base, precision, str(twice)])
        rate = n / (w2n - wn)
        walls.append(w1)
        rates.append(rate)
        model_rates.append(model["rates"][name][0])
        ratios.append(rate / model["rates"][name][0])
        cpu_img.append((c2n - cn) / n)
        net_cpu_img.append(model["cpu"][name][0])
        cpu_ratios.append(model["cpu"][name][0] / cpu_img[-1])
    return {
        "one_image_s": walls,
        "rate": rates,
        "model_rate": model_rates,
        "ratio": ratios,
        "cpu_ms_per_image": [1000 * c for c in cpu_img],
        "model_cpu_ms_per_image": [1000 * c for c in net_cpu_img],
        "cpu_ratio": cpu_ratios,
    }


def measure_help(i2v: str, rounds: int) -> dict[str, list[float]]:
    """Wall seconds of `i2v --help` and `i2v tag -h` (no network: torch and ONNX Runtime are not imported)."""
    return {" ".join(args): [run_cli([i2v, *args])[0] for _ in range(rounds)] for args in (["--help"], ["tag", "-h"])}


# --------------------------------------------------------------------------------------------------------


LABELS = {
    "naive": "naive eager NCHW",
    "i2v": "i2v default (auto backend)",
    "i2v-torch": "i2v --backend torch",
    "ort": "ONNX Runtime (plain session)",
    "i2v-bf16": "i2v --precision bf16",
    "i2v-int8": "i2v --precision int8 (ONNX Runtime)",
    "ov-fp32": "OpenVINO fp32 (plain export)",
    "ov-int8": "i2v --precision int8 (OpenVINO)",
    "torch-int8": "PyTorch FX int8 (x86, default qconfig)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="images in the folder (default 160)")
    parser.add_argument("--naive-images", type=int, default=64, help="of them, for the naive end-to-end row")
    parser.add_argument("--rounds", type=int, default=5, help="model-only rounds (median reported)")
    parser.add_argument("--accuracy-images", type=int, default=64, help="images for the int8 agreement columns")
    parser.add_argument("--quick", action="store_true", help="48 images, 2 rounds, no feature rows")
    parser.add_argument("--no-features", action="store_true", help="skip the feature-network rows")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end rows (model only)")
    parser.add_argument("--e2e-rounds", type=int, default=3, help="rounds of the start-up-free end-to-end ratio")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.quick:
        args.images, args.naive_images, args.rounds, args.no_features, args.e2e_rounds = 48, 24, 2, True, 1
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from importlib.metadata import PackageNotFoundError, version

    try:
        env_note = f"{os.cpu_count()} cores, torch {version('torch')}, onnxruntime {version('onnxruntime')}"
    except PackageNotFoundError:
        raise SystemExit("bench/run.py compares with ONNX Runtime: pip install -e '.[onnx]' first") from None
    have_ov = openvino_available()
    if have_ov:
        env_note += f", openvino {version('openvino')}"
    setup, _, _ = run_child(["setup", str(args.images)])
    models = {k: Path(v) for k, v in setup["models"].items()}
    folder = Path(setup["folder"])
    i2v = str(Path(sys.executable).with_name("i2v"))
    rows: list[tuple[str, float, float, str, dict | None]] = []  # name, img/s, peak RSS MB, note, accuracy
    int8_names = ["i2v-int8", *(["ov-int8"] if have_ov else []), "torch-int8"]

    # Model only, tag network: alternating rounds in one process; RSS of each from a one-round process.
    names = ["naive", "i2v", "i2v-torch", "ort", "i2v-bf16", *(["ov-fp32"] if have_ov else []), *int8_names]
    acc, _, _ = run_child(
        ["accuracy", "tag", ",".join(["i2v-bf16", *int8_names]), str(folder), str(args.accuracy_images)]
    )
    res, _, _ = run_child(["model", "tag", ",".join(names), str(args.rounds), "2"])
    med = {n: statistics.median(v) for n, v in res["rates"].items()}
    for n in names:
        _, _, rss = run_child(["model", "tag", n, "1", "1"])
        rows.append(
            (
                f"tag, model only: {LABELS[n]}",
                med[n],
                rss,
                f"max |diff| vs eager {res['maxdiff_vs_first'][n]:.1e}",
                acc.get(n),
            )
        )
    paired = {n: _paired(res["rates"], n, "ort") for n in names}
    paired_i2v = {n: _paired(res["rates"], n, "i2v") for n in names}

    # End to end.
    if not args.no_e2e:
        naive, _, rss = run_child(["naive-e2e", str(folder), str(args.naive_images)])
        rows.append(("tag, end to end: naive (PIL resize, eager)", naive["images"] / naive["seconds"], rss, "", None))
        out_file = OUT / "tags.jsonl"
        for precision in ("fp32", "int8"):
            cmd = [i2v, "tag", str(folder), "-w", str(models["tag"]), "-o", str(out_file), "--precision", precision]
            _, wall, rss = run_child([], cmd)  # int8: quantised by the accuracy child already, read from the cache
            rows.append(
                (f"tag, end to end: `i2v tag --precision {precision}`", args.images / wall, rss, f"{wall:.1f} s", None)
            )
        e2e = {p: measure_e2e(i2v, folder, models["tag"], args.images, args.e2e_rounds, p) for p in ("fp32", "int8")}
        if not args.no_features:
            for p in ("fp32", "int8"):
                e2e[f"features {p}"] = measure_e2e(
                    i2v, folder, models["feature"], args.images, args.e2e_rounds, p, kind="feature"
                )
        helps = measure_help(i2v, 3)
        stages, _, _ = run_child(["stages", str(folder), str(min(args.images, 48))])
    fres = None
    if not args.no_features:
        fint8 = ["i2v-int8", *(["ov-int8"] if have_ov else [])]
        fnames = ["naive", "i2v", "ort", *fint8]
        facc, _, _ = run_child(["accuracy", "feature", ",".join(fint8), str(folder), str(args.accuracy_images)])
        fres, _, _ = run_child(["model", "feature", ",".join(fnames), str(max(2, args.rounds - 2)), "2"])
        for n in fnames:
            _, _, frss = run_child(["model", "feature", n, "1", "1"])
            fmed = statistics.median(fres["rates"][n])
            rows.append((f"feature, model only: {LABELS[n]}", fmed, frss, "", facc.get(n)))
            paired[f"feature:{n}"] = _paired(fres["rates"], n, "ort")
            paired_i2v[f"feature:{n}"] = _paired(fres["rates"], n, "i2v")
        if not args.no_e2e:
            feat_out = OUT / "features.npy"
            for precision in ("fp32", "int8"):
                cmd = [
                    i2v,
                    "features",
                    str(folder),
                    "-w",
                    str(models["feature"]),
                    "-o",
                    str(feat_out),
                    "--precision",
                    precision,
                ]
                _, wall, rss = run_child([], cmd)
                rows.append(
                    (
                        f"feature, end to end: `i2v features --precision {precision}`",
                        args.images / wall,
                        rss,
                        f"{wall:.1f} s",
                        None,
                    )
                )
    resize, _, _ = run_child(["resize", str(folder)])

    print(f"\ni2v bench: {env_note}; batch {BATCH}; {args.images} mixed-size JPEG/PNG images\n")
    head = f"| {'what':62} | {'img/s':>7} | {'x naive':>7} | {'x ORT':>6} | {'x i2v fp32':>10} | {'peak RSS':>9}"
    print(head + " | agreement, max diff | note")
    print(f"| {'-' * 62} | {'-' * 7} | {'-' * 7} | {'-' * 6} | {'-' * 10} | {'-' * 9} | ---- | ----")
    for name, rate, rss, note, accuracy in rows:
        feature = name.startswith("feature")
        rates = fres["rates"] if feature else res["rates"]
        base = statistics.median(rates["naive"])
        if "end to end" in name and not feature and not args.no_e2e:
            base = naive["images"] / naive["seconds"]
        key = name.split(": ", 1)[1]
        short = next((k for k, v in LABELS.items() if v == key), None)
        ratio_ort = paired.get(f"feature:{short}" if feature else short)
        ratio_i2v = paired_i2v.get(f"feature:{short}" if feature else short)
        if ratio_ort is None:  # end to end: against the model-only medians
            ratio_ort = rate / statistics.median(rates["ort"])
            ratio_i2v = rate / statistics.median(rates["i2v"])
        acc_text = "" if accuracy is None else f"{accuracy['agreement']:.2%}, {accuracy['max_diff']:.3f}"
        print(
            f"| {name:62} | {rate:7.2f} | {rate / base:7.2f} | {ratio_ort:6.2f} | {ratio_i2v:10.2f} | {rss:6.0f} MB | "
            f"{acc_text} | {note}"
        )
    print(
        "\nx ORT and x i2v fp32 of the model-only rows: median of per-round ratios (same process, alternating rounds)"
    )
    spread = {n: _spread(res["rates"], n, "ort") for n in names}
    print("per-round x ORT spread (min-max), tag: " + ", ".join(f"{n} {a:.2f}-{b:.2f}" for n, (a, b) in spread.items()))
    if fres is not None:
        fspread = {n: _spread(fres["rates"], n, "ort") for n in fres["rates"]}
        print("feature: " + ", ".join(f"{n} {a:.2f}-{b:.2f}" for n, (a, b) in fspread.items()))
    print(
        "agreement: decisions at 0.5 (tag) or signs of encode1 (feature) unchanged against eager fp32 on "
        f"{args.accuracy_images} of the images; max diff: |dp| (tag), relative to the largest |feature| (feature)"
    )
    print(
        f"resize (i2v's exact Caffe/scikit-image resize): {resize['resize_ms_per_mp']:.1f} ms per megapixel; "
        f"decoding: {resize['decode_ms_per_mp']:.1f} ms per megapixel (one core)"
    )
    if not args.no_e2e:
        print_e2e(e2e, helps, stages, args.images)
    print(f"bench took {time.perf_counter() - started:.0f} s; outputs in {OUT}")


def _med(values: list[float], fmt: str = ".2f") -> str:
    """Median [min-max] of a list of measurements."""
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def print_e2e(e2e: dict[str, dict], helps: dict[str, list[float]], stages: dict, n: int) -> None:
    """End to end without start-up against model-only, start-up times, and where the CPU time of a run goes."""
    print(f"\n`i2v tag -b {BATCH}` (and `i2v features`) end to end, start-up taken out (n / (wall(2n) - wall(n)),")
    print(f"n = {n}), against i2v's own model-only rate measured in the same round; median [min-max] over rounds:\n")
    print("| run | e2e img/s | model-only img/s | e2e / model-only | by CPU time | CPU ms/img e2e | model-only |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for p, r in e2e.items():
        run = p if p.startswith("features") else f"tag {p}"
        print(
            f"| {run} | {_med(r['rate'], '.1f')} | {_med(r['model_rate'], '.1f')} | {_med(r['ratio'])} | "
            f"{_med(r['cpu_ratio'])} | {_med(r['cpu_ms_per_image'], '.0f')} | "
            f"{_med(r['model_cpu_ms_per_image'], '.0f')} |"
        )
    print("\nstart-up (wall seconds, median [min-max]): " + ", ".join(
        [f"`i2v {k}` {_med(v)}" for k, v in helps.items()]
        + [f"`i2v tag ONE_IMAGE` (cached export) {_med(e2e['fp32']['one_image_s'])}"]
    ))  # fmt: skip
    cpu = stages["cpu_ms_per_image"]
    rest = sum(v for k, v in cpu.items() if k != "network")
    print(
        f"\nwhere a run's CPU time goes, per image (ms, one thread, {stages['images']} images): "
        + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
        + f"; with the network filling every core, end to end reaches at most network / (network + the rest) = "
        f"{cpu['network'] / (cpu['network'] + rest):.2f} of model-only"
    )


def _paired(rates: dict[str, list[float]], name: str, ref: str) -> float:
    """Median over rounds of ``name``'s rate over ``ref``'s in the same round."""
    return statistics.median(a / b for a, b in zip(rates[name], rates[ref], strict=True))


def _spread(rates: dict[str, list[float]], name: str, ref: str) -> tuple[float, float]:
    ratios = [a / b for a, b in zip(rates[name], rates[ref], strict=True)]
    return min(ratios), max(ratios)


if __name__ == "__main__":
    main()
