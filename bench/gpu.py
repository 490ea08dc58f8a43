"""The GPU measurements of bench/gpu.sh: golden comparison, model-only throughput, end to end from JPEG files.

    python bench/gpu.py golden     --out DIR     # golden models on CUDA in fp32 with TF32 off vs expected/
    python bench/gpu.py throughput --out DIR     # full-size tag network, fp32/bf16/fp16 x batch sizes
    python bench/gpu.py e2e        --out DIR     # JPEG files -> nvJPEG decode -> exact resize on GPU -> network
    python bench/gpu.py cli        --out DIR     # the product: `i2v tag --device cuda` on the same files

Each writes NAME.json under --out and prints a Markdown table. ``--device cpu --smoke`` runs the same code on a
CPU with tiny sizes: how this script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the GPU machine runs i2v from the checkout, without installing it

GOLDEN = ROOT / "tests" / "data" / "golden"
#: (width, height) of the end-to-end JPEGs, cycled: as bench/run.py's mixed sizes.
SIZES = [(224, 224), (512, 512), (600, 800), (768, 1024), (1024, 768), (1200, 900), (850, 1200), (1920, 1080)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _strict_fp32() -> None:
    """fp32 as the reference computes it: no TF32 in matrix products or convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def _write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------


def golden(device: torch.device, out: Path, smoke: bool) -> dict:
    """The golden models on ``device`` in strict fp32 against the original pipeline's expected arrays."""
    from i2v_cli.weights import load_model

    _strict_fp32()
    inputs = torch.from_numpy(np.load(GOLDEN / "expected" / "inputs.npz")["inputs"]).to(device)
    rows = {}
    for model_file, expected_file in (
        ("tag_v1.caffemodel", "tag_v1.npy"),
        ("tag_v2.caffemodel", "tag_v2.npy"),
        ("feature_v1.caffemodel", "feature_v1.npy"),
    ):
        model, info = load_model(GOLDEN / "models" / model_file, device=str(device))
        with torch.inference_mode():
            got = model(inputs).float().cpu().numpy()
        want = np.load(GOLDEN / "expected" / expected_file)
        diff = np.abs(got - want)
        scale = 1.0 if info.kind == "tag" else float(np.abs(want).max())
        rows[model_file] = {
            "max_abs_diff_sq": float(diff[:3].max()),  # 224x224 images: the network alone
            "max_abs_diff_all": float(diff.max()),
            "max_rel_diff_all": float(diff.max() / scale),
            "ok": bool(diff[:3].max() <= 1e-4 * scale and diff.max() <= 1e-3 * scale),
        }
    result = {"device": _device_name(device), "tf32": False, "models": rows}
    _write(out, "golden", result)
    print("\n| golden model (fp32, TF32 off) | max abs diff 224x224 | max abs diff all | within tolerance |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['max_abs_diff_sq']:.2e} | {r['max_abs_diff_all']:.2e} | {r['ok']} |")
    return result


def _full_model(kind: str, device: torch.device):
    from i2v_cli.config import FEATURE, RELEASE_FEATURE_DIM, RELEASE_WIDTHS, TAG
    from i2v_cli.model import Architecture, Illust2VecNet

    torch.manual_seed(0)
    dim = 0 if kind == TAG else RELEASE_FEATURE_DIM
    arch = Architecture(TAG if kind == TAG else FEATURE, RELEASE_WIDTHS, dim)
    return Illust2VecNet(arch).to(device).eval()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _time_net(net, x: torch.Tensor, device: torch.device, seconds: float) -> float:
    """img/s of ``net`` on ``x``: warm-up, then as many calls as fit in about ``seconds`` (median of 3 runs)."""
    with torch.inference_mode():
        for _ in range(3):
            net(x)
        _sync(device)
        t = time.perf_counter()
        net(x)
        _sync(device)
        one = max(time.perf_counter() - t, 1e-4)
        calls = max(1, int(seconds / 3 / one))
        rates = []
        for _ in range(3):
            _sync(device)
            t = time.perf_counter()
            for _ in range(calls):
                net(x)
            _sync(device)
            rates.append(calls * x.shape[0] / (time.perf_counter() - t))
    return statistics.median(rates)


#: (network, precision, batch sizes) of the model-only table, the target's row first: bf16 on the tag network.
#: Strict fp32 (TF32 off) at large batches spent over a minute in cuDNN's autotuning on an H100: two sizes.
PLAN = [
    ("tag", "bf16", [1, 16, 64, 256, 512]),
    ("tag", "bf16+tf32 head", [256, 512]),  # the candidate of bench/head_precision.py: is the head a quarter?
    ("tag", "fp16", [64, 256, 512]),
    ("tag", "tf32", [256]),
    ("tag", "fp32", [64, 256]),
    ("feature", "bf16", [256, 512]),
]
SMOKE_PLAN = [("tag", "fp32", [1, 2]), ("tag", "bf16", [1, 2]), ("tag", "bf16+tf32 head", [2])]


def _tf32_head(net):
    """A TorchNet (bf16/fp16) whose head runs in TF32 instead of IEEE fp32: the speed of the candidate whose
    accuracy bench/head_precision.py measures."""
    from i2v_cli.config import TAG
    from i2v_cli.inference import fp32_mode

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=net.dtype):
            h = net.model.forward_features(x)
        with fp32_mode("tf32"):
            out = net.model.forward_head(h.float())
        return torch.sigmoid(out) if net.model.arch.kind == TAG else out

    net.forward = forward
    return net


def throughput(device: torch.device, out: Path, smoke: bool, seconds: float = 1.0, budget: float = 80.0) -> dict:
    """Model only, full-size networks: img/s for each precision and batch size (channels_last, cudnn autotune).
    Rows that would start after ``budget`` seconds are left out (and listed as such)."""
    from i2v_cli.inference import prepare_for_inference

    torch.backends.cudnn.benchmark = True
    size = 64 if smoke else 224
    rows = []
    started = time.perf_counter()
    models = {}
    for kind, precision, batches in SMOKE_PLAN if smoke else PLAN:
        if kind not in models:
            models.clear()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models[kind] = _full_model(kind, device)
        if precision.endswith("+tf32 head"):
            net = _tf32_head(prepare_for_inference(models[kind], precision=precision.split("+")[0], backend="torch"))
        else:
            net = prepare_for_inference(models[kind], precision=precision, backend="torch")
        if precision != "tf32":
            _strict_fp32()  # after preparing: fp32 rows are fp32, whatever the library sets for TF32
        for batch in batches:
            row = {"kind": kind, "precision": precision, "batch": batch, "img_s": None}
            rows.append(row)
            if time.perf_counter() - started > budget:
                row["skipped"] = "time budget"
                continue
            x = torch.randn(batch, 3, size, size, device=device) * 50
            try:
                row["img_s"] = _time_net(net, x, device, 0.2 if smoke else seconds)
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
                torch.cuda.empty_cache()
                continue
            print(f"  {kind} {precision} batch {batch}: {row['img_s']:,.0f} img/s", flush=True)
            _write(out, "throughput", {"device": _device_name(device), "input": size, "rows": rows})  # so far
    result = {"device": _device_name(device), "input": size, "tf32": False, "rows": rows}
    _write(out, "throughput", result)
    print("\n| network | precision | batch | img/s |\n| --- | --- | --- | --- |")
    for r in rows:
        rate = r.get("skipped", "") if r["img_s"] is None else f"{r['img_s']:,.0f}"
        print(f"| {r['kind']} | {r['precision']} | {r['batch']} | {rate} |")
    return result


# --------------------------------------------------------------------------------------------------------
# End to end from JPEG files


def make_jpegs(folder: Path, n: int, smoke: bool) -> list[Path]:
    """``n`` deterministic JPEG illustrations (mixed sizes), made once, in parallel."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"img{i:05d}.jpg" for i in range(n)]
    missing = [(i, p, smoke) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        from multiprocessing import Pool

        with Pool(min(16, os.cpu_count() or 1)) as pool:
            pool.map(_make_jpeg, missing, chunksize=8)
    return paths


def _make_jpeg(job: tuple[int, Path, bool]) -> None:
    from PIL import Image, ImageDraw

    i, path, smoke = job
    rng = np.random.default_rng(i)
    w, h = (160, 120) if smoke else SIZES[i % len(SIZES)]
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    base = (top * (1 - t) + bottom * t).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(np.broadcast_to(base, (h, w, 3))))
    draw = ImageDraw.Draw(img)
    for _ in range(10):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw.line((x0, y1, x1, y0), fill=(0, 0, 0), width=3)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def _pillow_chw(path: Path) -> torch.Tensor:
    """A file's RGB pixels as Pillow decodes them, (3, H, W) uint8."""
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def e2e(device: torch.device, out: Path, smoke: bool) -> dict:
    """JPEG files to tag probabilities: file reads in threads, nvJPEG batch decoding on the GPU
    (``torchvision.io.decode_jpeg(device="cuda")``), the exact resize on the GPU, the network in bf16."""
    from i2v_cli.gpudecode import GpuResize
    from i2v_cli.inference import prepare_for_inference
    from i2v_cli.transform import load_and_preprocess

    try:
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # no nvJPEG: decode with Pillow on the CPU (the row says so)
        torchvision = None
    n = 64 if smoke else 4096
    batch = 16 if smoke else 256
    paths = make_jpegs(out / "jpegs", n, smoke) if smoke else make_jpegs(Path("/tmp/i2v-gpu-jpegs"), n, smoke)
    resize = GpuResize(device)  # i2v's own (--decode cuda)
    torch.backends.cudnn.benchmark = True
    precision = "bf16"
    net = prepare_for_inference(_full_model("tag", device), precision=precision, backend="torch")
    _strict_fp32()  # the resize's matrix products in full fp32 (the network runs in bf16 under autocast)
    read = ThreadPoolExecutor(8)
    gpu_decode = torchvision is not None and device.type == "cuda"
    decoder = "nvJPEG (torchvision.io.decode_jpeg on the GPU)" if gpu_decode else "Pillow on the CPU, 8 threads"

    def load(path: Path) -> torch.Tensor:
        if torchvision is not None:
            return torchvision.io.read_file(str(path))
        return _pillow_chw(path)

    def read_batch(chunk: list[Path]) -> list[torch.Tensor]:
        return list(read.map(load, chunk))

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if gpu_decode:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        if torchvision is not None:
            return [decode_jpeg(d, mode=ImageReadMode.RGB).to(device) for d in datas]
        return [d.to(device) for d in datas]  # decoded by load() already

    # The GPU resize against i2v's CPU pipeline on files of every size, batched as the runs batch them: on
    # Pillow's pixels (the resize alone), then on the GPU decoder's (whose IDCT is not libjpeg's).
    sample = paths[: 2 * len(SIZES)]
    check = [load_and_preprocess(p) for p in sample]
    got = list(resize([_pillow_chw(p).to(device) for p in sample]).cpu())
    resize_diff = max(float((a - b).abs().max()) for a, b in zip(got, check, strict=True))
    got = list(resize(decode(read_batch(sample))).cpu())
    decoder_diff = max(float((a - b).abs().max()) for a, b in zip(got, check, strict=True))
    decoder_mean = float(np.mean([float((a - b).abs().mean()) for a, b in zip(got, check, strict=True)]))
    # What the GPU's decoding does to scores: the golden tag model (fp32), which reacts to fine texture.
    from i2v_cli.weights import load_model

    judge, _ = load_model(GOLDEN / "models" / "tag_v2.caffemodel", device=str(device))
    with torch.inference_mode():
        want, have = (judge(torch.stack(xs).to(device)).float().cpu().numpy() for xs in (check, got))
    score_diff = float(np.abs(want - have).max())
    agreement = float(((want >= 0.5) == (have >= 0.5)).mean())
    del judge

    def run(files: list[Path], timed: bool) -> tuple[float, dict]:
        """img/s over ``files``. ``timed``: a sync after each stage, to say where the time goes. Else the GPU work
        of a batch is queued without waiting, and its scores are read back after the next batch is queued."""
        stages = {"read": 0.0, "decode": 0.0, "resize": 0.0, "network": 0.0}
        _sync(device)
        start = time.perf_counter()
        pending = read.submit(read_batch, files[:batch])
        previous = None
        with torch.inference_mode():
            for i in range(0, len(files), batch):
                t0 = time.perf_counter()
                datas = pending.result()
                if i + batch < len(files):
                    pending = read.submit(read_batch, files[i + batch : i + 2 * batch])
                t1 = time.perf_counter()
                images = decode(datas)
                if timed:
                    _sync(device)
                t2 = time.perf_counter()
                x = resize(images)
                if timed:
                    _sync(device)
                t3 = time.perf_counter()
                scores = net(x).float()
                if timed:
                    scores.cpu()
                elif previous is not None:
                    previous.cpu()
                previous = scores
                t4 = time.perf_counter()
                for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    stages[k] += v
            if previous is not None:
                previous.cpu()
        return len(files) / (time.perf_counter() - start), stages

    run(paths[: 2 * batch], timed=True)  # warm-up: cudnn autotune, nvJPEG handles, resize matrices
    timed_rate, stages = run(paths, timed=True)
    rate, _ = run(paths, timed=False)
    total = sum(stages.values())
    result = {
        "device": _device_name(device),
        "images": n,
        "batch": batch,
        "precision": precision,
        "img_s": rate,
        "img_s_with_a_sync_per_stage": timed_rate,
        "stage_share": {k: v / total for k, v in stages.items()},
        "gpu_resize_max_abs_diff_vs_cpu": resize_diff,
        "gpu_decode_and_resize_max_abs_diff_vs_cpu": decoder_diff,
        "gpu_decode_and_resize_mean_abs_diff_vs_cpu": decoder_mean,
        "gpu_decode_golden_tag_scores": {"max_abs_diff": score_diff, "agreement_at_0.5": agreement},
        "sizes": "mixed, 224x224 to 1920x1080 JPEG quality 90" if not smoke else "160x120",
        "decoder": decoder,
    }
    _write(out, "e2e", result)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in result["stage_share"].items())
    print(f"\nend to end, JPEG files -> tags ({precision}, batch {batch}, {n} images, {decoder}): {rate:,.0f} img/s")
    print(f"  with a sync after each stage: {timed_rate:,.0f} img/s, time by stage {shares}")
    print(
        f"  network input against i2v's CPU pipeline (0-255 scale): GPU resize of Pillow's pixels max |diff| "
        f"{resize_diff:.1e}; with the GPU's decoding too {decoder_diff:.1e} (mean {decoder_mean:.2f})"
    )
    print(
        f"  the golden tag model on GPU-decoded inputs vs i2v's: max |dp| {score_diff:.3f}, {agreement:.2%} of "
        "decisions at 0.5 the same"
    )
    return result


def _env() -> dict[str, str]:
    """This process's environment with the checkout on PYTHONPATH: ``python -m i2v_cli`` without installing."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def _tag_jsonl(cmd: list[str]) -> dict[str, dict[str, float]]:
    """Run an ``i2v tag ... -f jsonl -t 0`` command; every record's scores by path (general, character,
    copyright and rating merged)."""
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env())
    if done.returncode != 0:
        raise SystemExit(f"bench/gpu.py: {' '.join(cmd[:4])} ... failed ({done.returncode}): {done.stderr[-2000:]}")
    scores = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        merged = {}
        for key in ("general", "character", "copyright", "rating"):
            merged.update({f"{key}:{tag}": float(v) for tag, v in record[key].items()})
        scores[record["path"]] = merged
    return scores


def _decoding_ceiling(paths: list[Path], processes: int) -> float:
    """img/s of i2v's CPU decoding and exact resize alone (no network, no pipes to a consumer) in a pool."""
    from multiprocessing import get_context

    from i2v_cli.transform import load_network_input

    with get_context("fork").Pool(processes) as pool:
        pool.map(load_network_input, paths[:processes], chunksize=1)  # every process started and warm
        start = time.perf_counter()
        pool.map(load_network_input, paths, chunksize=4)
        return len(paths) / (time.perf_counter() - start)


def cli(device: torch.device, out: Path, smoke: bool) -> dict:
    """The product itself on the GPU: ``i2v tag --device cuda`` (images decoded and resized exactly on the CPU
    by its worker processes, batches pinned and sent to the GPU, the network in bf16) over e2e's JPEG files.

    The rate excludes start-up and warm-up: (N - n) / (time of N files - time of the first n files). The same
    command at two worker counts says whether decoding or the GPU bounds it. First, the CLI's scores on the
    golden images with ``--device cuda`` (fp32) against ``--device cpu``."""
    from i2v_cli.config import RELEASE_WIDTHS, TAG
    from i2v_cli.weights import WeightsInfo, save_safetensors

    i2v = [sys.executable, "-m", "i2v_cli", "tag"]
    dev = "cuda" if device.type == "cuda" else "cpu"
    images = [str(GOLDEN / line) for line in (GOLDEN / "expected" / "order.txt").read_text().split()]
    golden_model = str(GOLDEN / "models" / "tag_v2.caffemodel")
    common = ["-w", golden_model, "-f", "jsonl", "-t", "0", "--no-progress", "-j", "2"]
    on_cpu = _tag_jsonl([*i2v, *images, *common, "--device", "cpu"])
    on_dev = _tag_jsonl([*i2v, *images, *common, "--device", dev])
    golden_diff = max(abs(on_dev[p][k] - v) for p, row in on_cpu.items() for k, v in row.items())
    print(f"CLI on the {len(on_cpu)} golden images, fp32: --device {dev} vs --device cpu, max |diff| {golden_diff:.1e}")

    n, first = (64, 16) if smoke else (4096, 512)
    batch = 16 if smoke else 256
    paths = make_jpegs(out / "jpegs", n, smoke) if smoke else make_jpegs(Path("/tmp/i2v-gpu-jpegs"), n, smoke)
    weights = Path("/tmp/i2v-gpu-tag-full.safetensors") if not smoke else out / "tag-full.safetensors"
    if not weights.is_file():
        info = WeightsInfo(TAG, RELEASE_WIDTHS, 0, 1539, "bench-gpu-tag", "bench-gpu-tag", "bench")
        save_safetensors(_full_model(TAG, torch.device("cpu")).state_dict(), weights, info.to_metadata())
    scratch = out if smoke else Path("/tmp/i2v-gpu")  # $OUT brings back 8 files at most: the results only
    scratch.mkdir(parents=True, exist_ok=True)
    lists = {}
    for count in (first, n):
        lists[count] = scratch / f"files-{count}.txt"
        lists[count].write_text("".join(f"{p}\n" for p in paths[:count]))
    cores = os.cpu_count() or 1
    rows = []
    ceiling = _decoding_ceiling(paths[:first], max(1, cores - 1))
    print(f"CPU decoding and exact resize alone, {max(1, cores - 1)} processes: {ceiling:,.0f} img/s", flush=True)
    runs = [(min(4, cores), "cpu"), (0, "cpu")] + ([(0, "cuda")] if device.type == "cuda" else [])
    for workers, decode in runs:
        cmd = [*i2v, "-", "-w", str(weights), "--device", dev, "-b", str(batch), "--no-progress", "-k", "8"]
        cmd += ["--precision", "bf16", "-f", "jsonl", "-o", str(scratch / "cli-tags.jsonl")]
        cmd += ["-j", str(workers)] if workers else []  # 0 here: the default (all cores but one on a GPU)
        cmd += ["--decode", decode]
        times = {}
        for count, listing in lists.items():
            with listing.open() as stdin:
                start = time.perf_counter()
                done = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=False, env=_env())
                times[count] = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(
                    f"bench/gpu.py: i2v tag -j {workers} failed ({done.returncode}): {done.stderr[-2000:]}"
                )
        rate = (n - first) / max(times[n] - times[first], 1e-6)
        rows.append({"workers": workers or "default", "decode": decode, "img_s": rate, "wall_s": times})
        print(
            f"  i2v tag --device {dev} -b {batch} --precision bf16 -j {workers or 'default'} --decode {decode}: "
            f"{rate:,.0f} img/s "
            f"(start-up excluded; {n} files in {times[n]:.1f} s wall)",
            flush=True,
        )
    result = {
        "device": _device_name(device),
        "images": n,
        "batch": batch,
        "precision": "bf16",
        "cores": cores,
        "golden_cli_max_abs_diff_vs_cpu": golden_diff,
        "cpu_decoding_ceiling_img_s": ceiling,
        "rows": rows,
    }
    _write(out, "cli", result)
    print("\n| i2v tag on the GPU (bf16), files | decode | workers | img/s, start-up excluded |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {n} mixed-size JPEG files | {r['decode']} | {r['workers']} | {r['img_s']:,.0f} |")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["golden", "throughput", "e2e", "cli"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: to check the script, not to measure")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device is visible to PyTorch (use --device cpu --smoke to check)")
    {"golden": golden, "throughput": throughput, "e2e": e2e, "cli": cli}[args.what](device, args.out, args.smoke)


if __name__ == "__main__":
    main()
