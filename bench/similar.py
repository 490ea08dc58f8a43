"""Exact search speed of `i2v similar`'s engine: 1,000,000 binary and 100,000 float random vectors.

    .venv/bin/python bench/similar.py            # writes bench/out/similar/ once (2.1 GB), then times queries

Prints seconds per query (one query, then ten at once) and vectors scanned per second, and the peak RSS (the
memory-mapped index counts in it while its pages are cached).
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from i2v_cli.features import FeatureWriter, read_features
from i2v_cli.similar import search

OUT = Path(__file__).resolve().parent / "out" / "similar"


def build(path: Path, rows: int, binary: bool) -> None:
    """``rows`` random feature vectors (4096 bits or 4096 floats) with paths ``img{i}.png``, written once."""
    if path.is_file():
        return
    rng = np.random.default_rng(0)
    step = 50_000 if binary else 10_000
    with FeatureWriter(path, dim=4096, binary=binary) as writer:
        for start in range(0, rows, step):
            names = [f"img{i}.png" for i in range(start, start + step)]
            if binary:
                writer.append(names, rng.integers(0, 256, (step, 512), dtype=np.uint8))
            else:
                writer.append(names, rng.standard_normal((step, 4096), dtype=np.float32))


def time_queries(name: str, path: Path) -> None:
    index = read_features(path)
    query = np.array(index.vectors[123])
    for n in (1, 1, 10):
        started = time.perf_counter()
        found = search(index.vectors, np.stack([query] * n), 10)
        seconds = time.perf_counter() - started
        assert found[0].rows[0] == 123  # the query's own row is its nearest
        rate = len(index) * n / seconds / 1e6
        print(f"{name}: {n:2d} queries, {seconds / n:.3f} s a query, {rate:.2f} M vectors/s")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    build(OUT / "binary.npy", 1_000_000, binary=True)
    build(OUT / "float.npy", 100_000, binary=False)
    time_queries("1,000,000 binary vectors (512 MB)", OUT / "binary.npy")
    time_queries("100,000 float vectors (1.6 GB)", OUT / "float.npy")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
