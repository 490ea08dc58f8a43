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
#: (width, height) of the synthetic illustrations, cycled: thumbnails to phone and 2K scans.
SIZES = [(224, 224), (512, 512), (600, 800), (768, 1024), (1024, 768), (1200, 900), (850, 1200), (1920, 1080)]


# --------------------------------------------------------------------------------------------------------
# Inputs


def build_models() -> dict[str, Path]:
    """Full-size tag and feature models with random weights, written once as i2v safetensors files."""
    import torch

    from i2v_cli.config import FEATURE, RELEASE_FEATURE_DIM, RELEASE_WIDTHS, TAG
    from i2v_cli.model import Architecture, Illust2VecNet
    from i2v_cli.weights import WeightsInfo, save_safetensors

    paths = {}
    for kind, dim in ((TAG, 0), (FEATURE, RELEASE_FEATURE_DIM)):
        path = OUT / "models" / f"{kind}.safetensors"
        paths[kind] = path
        if path.is_file():
            continue
        torch.manual_seed(0)
        model = Illust2VecNet(Architecture(kind, RELEASE_WIDTHS, dim))
        info = WeightsInfo(kind, RELEASE_WIDTHS, dim, 1539, f"bench-{kind}", f"bench-random-{kind}-seed0", "bench")
        save_safetensors(model.state_dict(), path, info.to_metadata())
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

    model, _ = load_model(OUT / "models" / f"{kind}.safetensors", kind=kind)
    return model


def _predictors(kind: str, names: list[str]) -> dict:
    """Callables for the model-only rows: eager NCHW (naive), i2v (default, torch, bf16), ONNX Runtime."""
    import torch

    from i2v_cli.inference import export_onnx, prepare_for_inference

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
        elif name == "ort":  # a plain session, default options: the reference runtime as anyone would use it
            import onnxruntime as ort

            path = OUT / "cache" / f"plain-{kind}.onnx"
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                export_onnx(model, path)  # the whole network, as anyone would export it
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            out[name] = lambda x, s=session: torch.from_numpy(s.run(None, {"input": x.numpy()})[0])
    return out


def child_model_only(kind: str, names: list[str], rounds: int, batches: int) -> dict:
    """img/s of each predictor on the same (8, 3, 224, 224) batches, alternating round by round."""
    import torch

    preds = _predictors(kind, names)
    x = torch.randn(BATCH, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 50
    rates: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        ref = preds[names[0]](x).float()
        diffs = {n: float((p(x).float() - ref).abs().max()) for n, p in preds.items()}
        for _ in range(rounds):
            for n, p in preds.items():
                t = time.perf_counter()
                for _ in range(batches):
                    p(x)
                rates[n].append(BATCH * batches / (time.perf_counter() - t))
    return {"rates": rates, "maxdiff_vs_first": diffs}


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


def _child(argv: list[str]) -> None:
    what = argv[0]
    if what == "setup":
        result = {"models": {k: str(v) for k, v in build_models().items()}, "folder": str(build_images(int(argv[1])))}
    elif what == "model":
        result = child_model_only(argv[1], argv[2].split(","), int(argv[3]), int(argv[4]))
    elif what == "naive-e2e":
        result = child_naive_e2e(argv[1], int(argv[2]))
    else:
        result = child_resize(argv[1])
    print(json.dumps(result))


def run_child(args: list[str], cmd: list[str] | None = None) -> tuple[dict, float, float]:
    """Run a child (this script with ``--child`` or a command); its JSON output, wall seconds and peak RSS (MB)."""
    cmd = cmd or [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f, text=True)
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


# --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=160, help="images in the folder (default 160)")
    parser.add_argument("--naive-images", type=int, default=64, help="of them, for the naive end-to-end row")
    parser.add_argument("--rounds", type=int, default=5, help="model-only rounds (median reported)")
    parser.add_argument("--quick", action="store_true", help="48 images, 2 rounds, no feature rows")
    parser.add_argument("--no-features", action="store_true", help="skip the feature-network rows")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    if args.quick:
        args.images, args.naive_images, args.rounds, args.no_features = 48, 24, 2, True
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from importlib.metadata import PackageNotFoundError, version

    try:
        env_note = f"{os.cpu_count()} cores, torch {version('torch')}, onnxruntime {version('onnxruntime')}"
    except PackageNotFoundError:
        raise SystemExit("bench/run.py compares with ONNX Runtime: pip install -e '.[onnx]' first") from None
    setup, _, _ = run_child(["setup", str(args.images)])
    models = {k: Path(v) for k, v in setup["models"].items()}
    folder = Path(setup["folder"])
    i2v = str(Path(sys.executable).with_name("i2v"))
    rows: list[tuple[str, float, float, str]] = []  # name, img/s, peak RSS MB, note

    # Model only, tag network: alternating rounds in one process; RSS of each from a one-round process.
    names = ["naive", "i2v", "i2v-torch", "ort", "i2v-bf16"]
    res, _, _ = run_child(["model", "tag", ",".join(names), str(args.rounds), "2"])
    med = {n: statistics.median(v) for n, v in res["rates"].items()}
    labels = {
        "naive": "tag, model only: naive eager NCHW",
        "i2v": "tag, model only: i2v default (auto backend)",
        "i2v-torch": "tag, model only: i2v --backend torch",
        "ort": "tag, model only: ONNX Runtime (plain session)",
        "i2v-bf16": "tag, model only: i2v --precision bf16",
    }
    for n in names:
        _, _, rss = run_child(["model", "tag", n, "1", "1"])
        rows.append((labels[n], med[n], rss, f"max |diff| vs eager {res['maxdiff_vs_first'][n]:.1e}"))
    paired = statistics.median(a / b for a, b in zip(res["rates"]["i2v"], res["rates"]["ort"], strict=True))

    # End to end.
    naive, _, rss = run_child(["naive-e2e", str(folder), str(args.naive_images)])
    rows.append(("tag, end to end: naive (PIL resize, eager)", naive["images"] / naive["seconds"], rss, ""))
    out_file = OUT / "tags.jsonl"
    _, wall, rss = run_child([], [i2v, "tag", str(folder), "-w", str(models["tag"]), "-o", str(out_file)])
    rows.append(("tag, end to end: `i2v tag` (whole command)", args.images / wall, rss, f"{wall:.1f} s"))
    if not args.no_features:
        fnames = ["naive", "i2v", "ort"]
        fres, _, frss = run_child(["model", "feature", ",".join(fnames), str(max(2, args.rounds - 2)), "2"])
        for n in fnames:
            fmed = statistics.median(fres["rates"][n])
            rows.append((labels[n].replace("tag,", "feature,"), fmed, frss, "one process for the three"))
        feat_out = OUT / "features.npy"
        cmd = [i2v, "features", str(folder), "-w", str(models["feature"]), "-o", str(feat_out)]
        _, wall, rss = run_child([], cmd)
        rows.append(("feature, end to end: `i2v features`", args.images / wall, rss, f"{wall:.1f} s"))
    resize, _, _ = run_child(["resize", str(folder)])

    naive_model = med["naive"]
    naive_feature = statistics.median(fres["rates"]["naive"]) if not args.no_features else float("nan")
    print(f"\ni2v bench: {env_note}; batch {BATCH}; {args.images} mixed-size JPEG/PNG images\n")
    print(f"| {'what':48} | {'img/s':>7} | {'x naive':>7} | {'x ORT':>6} | {'peak RSS':>9} | note")
    print(f"| {'-' * 48} | {'-' * 7} | {'-' * 7} | {'-' * 6} | {'-' * 9} | ----")
    for name, rate, rss, note in rows:
        base = naive["images"] / naive["seconds"] if "end to end" in name and name.startswith("tag") else naive_model
        ort_rate = med["ort"] if name.startswith("tag") else statistics.median(fres["rates"]["ort"])
        vs_naive = rate / (naive_feature if name.startswith("feature") else base)
        print(f"| {name:48} | {rate:7.2f} | {vs_naive:7.2f} | {rate / ort_rate:6.2f} | {rss:6.0f} MB | {note}")
    print(f"\ni2v default / ONNX Runtime, model only, median of per-round ratios: {paired:.3f}")
    print(
        f"resize (i2v's exact Caffe/scikit-image resize): {resize['resize_ms_per_mp']:.1f} ms per megapixel; "
        f"decoding: {resize['decode_ms_per_mp']:.1f} ms per megapixel (one core)"
    )
    print(f"bench took {time.perf_counter() - started:.0f} s; outputs in {OUT}")


if __name__ == "__main__":
    main()
