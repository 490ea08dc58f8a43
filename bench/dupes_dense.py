"""``i2v dupes`` on a collection with dense clusters: thousands of byte-identical copies of one image (a
placeholder saved again and again) and thousands of near-copies of another (re-encodes: different bytes).

    .venv/bin/python bench/dupes_dense.py                          # 200,000 images, 20,000 + 20,000 copies
    .venv/bin/python bench/dupes_dense.py --images 50000 --near 5000 --identical 5000 --dim 4096

A cluster of m near-copies is m^2/2 pairs (2e8 at 20,000): this measures the time and peak RSS of the sketch
search over such a collection, and checks the two clusters come out as two whole groups. Reference in the same
run: the same collection without the clusters (``--images`` rows of distinct images only).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np

from i2v_cli.config import NUM_TAGS
from i2v_cli.dupes import find_dupes
from i2v_cli.index import FileState, Index

OUT = Path(__file__).resolve().parent / "out" / "dupes_dense"


def build(db: Path, images: int, near: int, identical: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim), dtype=np.float32) * 2
    scores = np.zeros(NUM_TAGS, np.float32)
    scores[-3] = 1.0
    with Index(str(db), create=True) as idx:
        idx.check_models({"source": "bench", "sha256": "0"}, {"source": "bench", "sha256": "0"}, dim)
        total = images + near + identical
        for first in range(0, total, 2000):
            with idx.transaction():
                for i in range(first, min(first + 2000, total)):
                    sha = i.to_bytes(32, "big")
                    if i < images:
                        feature = centres[i % len(centres)] + rng.standard_normal(dim, dtype=np.float32)
                    elif i < images + near:  # near-copies of image 0: cosine about 0.99 with it
                        feature = centres[0] + rng.standard_normal(dim, dtype=np.float32) * 0.1
                    else:  # identical copies of image 1: same bytes, same feature
                        sha = (1).to_bytes(32, "big")
                        feature = idx.feature(2)
                    if i == 0:
                        feature = centres[0].copy()
                    state = FileState(f"/collection/{i:08d}.png", 1000, i, sha, 1000, 800, "PNG")
                    idx.put(state, scores, feature, None)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--near", type=int, default=20_000)
    parser.add_argument("--identical", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"cpus {os.cpu_count()}, load {os.getloadavg()}", flush=True)
    for label, near, identical in (("reference (no clusters)", 0, 0), ("with the clusters", args.near, args.identical)):
        db = OUT / f"dense-{args.images}-{near}-{identical}-{args.dim}.db"
        if not db.exists():
            start = time.perf_counter()
            build(db, args.images, near, identical, args.dim)
            print(f"built {db.name} in {time.perf_counter() - start:.0f} s", flush=True)
        with Index(str(db), readonly=True) as idx:
            start = time.perf_counter()
            groups = find_dupes(idx, 0.95)
            seconds = time.perf_counter() - start
        sizes = sorted((len(g.others) + 1 for g in groups), reverse=True)
        print(f"{label}: {args.images + near + identical} images, dupes in {seconds:.1f} s, {len(groups)} groups, "
              f"largest {sizes[:3]}; peak RSS so far {rss_gb():.2f} GB; load {os.getloadavg()}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
