"""The GPU measurements of bench/gpu.sh: golden comparison, model-only throughput, end to end from JPEG files.

    python bench/gpu.py golden     --out DIR     # golden models on CUDA in fp32 with TF32 off vs expected/
    python bench/gpu.py throughput --out DIR     # full-size tag network, fp32/bf16/fp16 x batch sizes
    python bench/gpu.py e2e        --out DIR     # JPEG files -> nvJPEG decode -> exact resize on GPU -> network

Each writes NAME.json under --out and prints a Markdown table. ``--device cpu --smoke`` runs the same code on a
CPU with tiny sizes: how this script is tested where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def throughput(device: torch.device, out: Path, smoke: bool, seconds: float = 1.5) -> dict:
    """Model only, full-size networks: img/s for each precision and batch size (channels_last, cudnn autotune)."""
    from i2v_cli.inference import prepare_for_inference

    torch.backends.cudnn.benchmark = True
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    batches = [1, 2] if smoke else [1, 8, 32, 64, 128, 256, 512]
    size = 64 if smoke else 224
    rows = []
    for kind in ("tag", "feature"):
        model = _full_model(kind, device)
        for precision in precisions:
            if kind == "feature" and precision != "bf16" and not smoke:
                continue  # the feature network's trunk is the tag network's; one precision shows encode1's cost
            net = prepare_for_inference(model, precision=precision, backend="torch")
            _strict_fp32()  # after preparing: fp32 rows are fp32, whatever the library sets for TF32
            for batch in batches if kind == "tag" else batches[-2:]:
                x = torch.randn(batch, 3, size, size, device=device) * 50
                if kind == "feature" and size != 224:
                    continue  # encode1 needs the 7x7 map of a 224x224 input
                try:
                    rate = _time_net(net, x, device, 0.2 if smoke else seconds)
                except torch.OutOfMemoryError:
                    rows.append({"kind": kind, "precision": precision, "batch": batch, "img_s": None})
                    torch.cuda.empty_cache()
                    continue
                rows.append({"kind": kind, "precision": precision, "batch": batch, "img_s": rate})
                print(f"  {kind} {precision} batch {batch}: {rate:,.0f} img/s", flush=True)
                _write(out, "throughput", {"device": _device_name(device), "input": size, "rows": rows})  # so far
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": _device_name(device), "input": size, "tf32": False, "rows": rows}
    _write(out, "throughput", result)
    print("\n| network | precision | batch | img/s |\n| --- | --- | --- | --- |")
    for r in rows:
        rate = "out of memory" if r["img_s"] is None else f"{r['img_s']:,.0f}"
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


class GpuResize:
    """i2v's exact resize (spec step 2) as two matrix products on the GPU: the same banded matrices as the CPU
    path (``preprocess._axis_weights``), made dense once per input size."""

    def __init__(self, device: torch.device, size: int = 224) -> None:
        self.device, self.size, self.cache = device, size, {}

    def _matrix(self, n_in: int) -> torch.Tensor:
        from i2v_cli.transform import _axis_weights

        if n_in not in self.cache:
            starts, weights = _axis_weights(n_in, self.size)
            dense = np.zeros((self.size, n_in))
            for i, (s, row) in enumerate(zip(starts, weights, strict=True)):
                dense[i, s : s + len(row)] = row
            if n_in == self.size:
                dense = np.eye(n_in)
            self.cache[n_in] = torch.from_numpy(dense).to(self.device, torch.float32)
        return self.cache[n_in]

    def __call__(self, chw: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 RGB on the GPU to the (3, 224, 224) network input (BGR minus the mean)."""
        from i2v_cli.config import MEAN_BGR

        x = chw.float()
        lo, hi = x.amin(), x.amax()
        span = (hi - lo).clamp_min(1e-12)
        y = self._matrix(x.shape[1]) @ (x - lo) @ self._matrix(x.shape[2]).T  # (3, 224, 224)
        y = torch.where(hi > lo, y.clamp(0, 1e9).minimum(span) + lo, lo.expand_as(y))
        mean = torch.tensor(MEAN_BGR, device=self.device).view(3, 1, 1)
        return y.flip(0) - mean


def e2e(device: torch.device, out: Path, smoke: bool) -> dict:
    """JPEG files to tag probabilities: file reads in threads, nvJPEG batch decoding on the GPU
    (``torchvision.io.decode_jpeg(device="cuda")``), the exact resize on the GPU, the network in bf16."""
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
    resize = GpuResize(device)
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
        from PIL import Image

        with Image.open(path) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()

    def read_batch(chunk: list[Path]) -> list[torch.Tensor]:
        return list(read.map(load, chunk))

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        if gpu_decode:
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
        if torchvision is not None:
            return [decode_jpeg(d, mode=ImageReadMode.RGB).to(device) for d in datas]
        return [d.to(device) for d in datas]  # decoded by load() already

    # The GPU resize against i2v's CPU pipeline on a few files: the same network input.
    check = [load_and_preprocess(p) for p in paths[:4]]
    got = [resize(img).cpu() for img in decode(read_batch(paths[:4]))]
    resize_diff = max(float((a - b).abs().max()) for a, b in zip(got, check, strict=True))

    def run(files: list[Path]) -> tuple[float, dict]:
        stages = {"read": 0.0, "decode": 0.0, "resize": 0.0, "network": 0.0}
        _sync(device)
        start = time.perf_counter()
        pending = read.submit(read_batch, files[:batch])
        with torch.inference_mode():
            for i in range(0, len(files), batch):
                t0 = time.perf_counter()
                datas = pending.result()
                if i + batch < len(files):
                    pending = read.submit(read_batch, files[i + batch : i + 2 * batch])
                t1 = time.perf_counter()
                images = decode(datas)
                _sync(device)
                t2 = time.perf_counter()
                x = torch.stack([resize(img) for img in images])
                _sync(device)
                t3 = time.perf_counter()
                net(x).float().cpu()
                t4 = time.perf_counter()
                for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                    stages[k] += v
        return len(files) / (time.perf_counter() - start), stages

    run(paths[: 2 * batch])  # warm-up: cudnn autotune, nvJPEG handles, resize matrices
    rate, stages = run(paths)
    total = sum(stages.values())
    result = {
        "device": _device_name(device),
        "images": n,
        "batch": batch,
        "precision": precision,
        "img_s": rate,
        "stage_share": {k: v / total for k, v in stages.items()},
        "gpu_resize_max_abs_diff_vs_cpu": resize_diff,
        "sizes": "mixed, 224x224 to 1920x1080 JPEG quality 90" if not smoke else "160x120",
        "decoder": decoder,
    }
    _write(out, "e2e", result)
    shares = ", ".join(f"{k} {v:.0%}" for k, v in result["stage_share"].items())
    print(f"\nend to end, JPEG files -> tags ({precision}, batch {batch}, {n} images, {decoder}): {rate:,.0f} img/s")
    print(f"  time by stage (sequential in this loop): {shares}; GPU resize vs CPU: max |diff| {resize_diff:.1e}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["golden", "throughput", "e2e"])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: to check the script, not to measure")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device is visible to PyTorch (use --device cpu --smoke to check)")
    {"golden": golden, "throughput": throughput, "e2e": e2e}[args.what](device, args.out, args.smoke)


if __name__ == "__main__":
    main()
