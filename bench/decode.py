"""Peak memory and time of decoding + preprocessing one file, for the sizes where memory matters.

    .venv/bin/python bench/decode.py                 # images made once under /tmp/i2v-decode-bench
    .venv/bin/python bench/decode.py --only wide     # one of: small, wide, tall, big

Each measurement runs in a fresh process (``load_and_preprocess(path)`` once, one torch thread): the peak
RSS while it runs (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``; Linux only) and its
wall time. The "small" row (a 640x480 JPEG) is the reference: the other rows' extra memory
over it is what the image itself costs. ``--module`` picks where ``load_and_preprocess`` is imported from,
so that an older tree can be measured the same way (``PYTHONPATH=/old/tree ... --module i2v_cli.preprocess``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = {
    "small": ("small.jpg", (640, 480)),
    "wide": ("wide.png", (1_000_000, 1)),  # (width, height)
    "tall": ("tall.png", (1, 1_000_000)),
    "big": ("big.jpg", (9000, 9000)),  # 81 megapixels
}

CHILD = """
import json, sys, time, importlib
module = importlib.import_module(sys.argv[1])
import torch
torch.set_num_threads(1)

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))

before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' own peak is not the image's
t = time.perf_counter()
out = module.load_and_preprocess(sys.argv[2])
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak_mb": status("VmHWM"), "before_mb": before, "shape": list(out.shape)}))
"""


def make_images(folder: Path) -> None:
    """Deterministic test images: a smooth gradient with noise (realistic JPEG sizes), made once."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGES.values():
        path = folder / name
        if path.exists():
            continue
        if width * height > 10_000_000:  # build the big one in bands to keep this script's own memory low
            img = Image.new("RGB", (width, height))
            band = 500
            for y0 in range(0, height, band):
                rows = min(band, height - y0)
                yy = np.arange(y0, y0 + rows)[:, None, None]
                xx = np.arange(width)[None, :, None]
                base = (xx * 255 // width + yy * 255 // height + np.array([0, 60, 120])) % 256
                noise = rng.integers(-12, 13, (rows, width, 3))
                img.paste(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)), (0, y0))
        else:
            arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            img = Image.fromarray(arr)
        img.save(path, quality=90) if name.endswith(".jpg") else img.save(path)


def measure(module: str, path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, module, str(path)], check=True, capture_output=True, text=True, env=os.environ
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/i2v-decode-bench", help="where the test images are made")
    parser.add_argument("--module", default="i2v_cli.transform", help="module holding load_and_preprocess")
    parser.add_argument("--only", choices=sorted(IMAGES), action="append", help="measure only these images")
    args = parser.parse_args()
    folder = Path(args.dir)
    make_images(folder)
    names = args.only or list(IMAGES)
    if "small" not in names:
        names = ["small", *names]
    rows = {name: measure(args.module, folder / IMAGES[name][0]) for name in names}
    ref = rows["small"]["peak_mb"]
    print(f"{'image':8} {'size':>17} {'seconds':>8} {'RSS before':>11} {'peak RSS MB':>12} {'over small':>11}")
    for name, row in rows.items():
        width, height = IMAGES[name][1]
        extra = row["peak_mb"] - ref
        print(
            f"{name:8} {f'{width}x{height}':>17} {row['seconds']:8.2f} {row['before_mb']:11.0f} "
            f"{row['peak_mb']:12.0f} {extra:+11.0f}"
        )


if __name__ == "__main__":
    main()
