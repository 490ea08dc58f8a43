"""What indexing a folder costs against tagging it and extracting its features: `i2v index` (both networks on
one decode, plus hashing and SQLite) against `i2v tag -t 0` + `i2v features` on the same folder, with the
full-size synthetic networks of bench/run.py. Rounds alternate the order of the commands, each in a fresh
process as a user runs it (start-up included), and the ratio is taken per round, so a noisy neighbour slows both
sides alike; the median and the spread over rounds are printed.

    .venv/bin/python bench/index_cost.py                 # 48 images, 3 rounds
    .venv/bin/python bench/index_cost.py --images 96 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import build_images, build_models


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = build_models()
    folder = build_images(args.images)
    i2v = [sys.executable, "-m", "i2v_cli"]
    ratios, sides = [], []
    print(f"{args.images} images in {folder}; cpus {os.cpu_count()}, load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            db = os.path.join(tmp, f"c{r}.db")
            tag = [*i2v, "tag", str(folder), "-w", str(models["tag"]), "-t", "0", "-f", "jsonl",
                   "-o", os.path.join(tmp, f"t{r}.jsonl")]  # fmt: skip
            feat = [*i2v, "features", str(folder), "-w", str(models["feature"]), "-o", os.path.join(tmp, f"f{r}.npy")]
            index = [*i2v, "index", str(folder), "--db", db, "--tag-weights", str(models["tag"]),
                     "--feature-weights", str(models["feature"])]  # fmt: skip
            if r % 2 == 0:
                separate = timed(tag) + timed(feat)
                together = timed(index)
            else:
                together = timed(index)
                separate = timed(tag) + timed(feat)
            ratios.append(together / separate)
            sides.append((together, separate))
            print(f"round {r + 1}: i2v index {together:.1f} s, i2v tag + i2v features {separate:.1f} s, "
                  f"ratio {together / separate:.2f}", flush=True)  # fmt: skip
    print(f"i2v index / (i2v tag + i2v features): median {statistics.median(ratios):.2f} "
          f"[{min(ratios):.2f}-{max(ratios):.2f}] over {len(ratios)} rounds; load {os.getloadavg()}")  # fmt: skip


if __name__ == "__main__":
    main()
