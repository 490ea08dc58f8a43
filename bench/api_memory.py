"""Peak memory of the Python API over many small images: it should be that of one batch, whatever their number.

    .venv/bin/python bench/api_memory.py                      # 10,000 images, a generator and a list
    .venv/bin/python bench/api_memory.py --images 2500 --api OLD_API.py   # an earlier api.py, to compare

Each case runs in a process of its own on the small golden tag model (tests/data/golden). After the model is
loaded, a warm-up call on one batch of images prepares the network (an ONNX export on a CPU) and measures what
one batch costs; then the call on N images. It prints, over the resident memory of the loaded model: the peak
of the one-batch call, the peak of the N-image call (``ru_maxrss``), and the size of the result itself
(N x 1539 float32), which any API returning an array must hold (twice, briefly, while the per-batch results
are joined). Images are random 100x120 RGB arrays, given as a generator or as a list made beforehand (the
list's own memory is counted in neither figure).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "tests" / "data" / "golden" / "models" / "tag_v2.caffemodel"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(case: str, n: int, batch_size: int, api_file: str | None) -> dict[str, float]:
    import numpy as np

    if api_file:  # an earlier api.py, imported as a module of the package so its relative imports work
        spec = importlib.util.spec_from_file_location("i2v_cli._bench_api", api_file)
        api = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = api
        spec.loader.exec_module(api)
    else:
        from i2v_cli import api
    tagger = api.load(WEIGHTS, device="cpu", batch_size=batch_size)
    rng = np.random.default_rng(0)

    def image(i: int) -> np.ndarray:
        return rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)

    images = (image(i) for i in range(n)) if case == "generator" else [image(i) for i in range(n)]
    loaded = _rss_mb()
    tagger.estimate_probabilities([image(i) for i in range(batch_size)])  # warm-up: prepares the network
    one_batch = _peak_mb() - loaded
    prob = tagger.estimate_probabilities(images)
    assert prob.shape == (n, 1539)
    return {"loaded_mb": loaded, "batch_mb": one_batch, "run_mb": _peak_mb() - loaded, "result_mb": prob.nbytes / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cases", default="generator,list")
    parser.add_argument("--api", help="an api.py to measure instead of the installed one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.images, args.batch_size, args.api)))
        return
    print(f"{'case':<10} {'images':>7} {'model MB':>9} {'+1 batch MB':>12} {'+N images MB':>13} {'result MB':>10}")
    for case in args.cases.split(","):
        cmd = [sys.executable, __file__, "--child", case, "--images", str(args.images)]
        cmd += ["--batch-size", str(args.batch_size)] + (["--api", args.api] if args.api else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.splitlines()[-1])
        print(
            f"{case:<10} {args.images:>7} {r['loaded_mb']:>9.0f} {r['batch_mb']:>12.0f} {r['run_mb']:>13.0f} "
            f"{r['result_mb']:>10.1f}"
        )


if __name__ == "__main__":
    main()
