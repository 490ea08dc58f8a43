"""One-image `i2v tag` with warm caches: wall and CPU seconds, this checkout against another revision, alternately.

    .venv/bin/python bench/startup.py                       # this checkout vs HEAD~3, 7 rounds
    .venv/bin/python bench/startup.py --against 7540cb7 --rounds 9 --image some.jpg
    .venv/bin/python bench/startup.py --against HEAD --images 96   # a whole run: 96 mixed-size images

With ``--images N`` each run tags the first N images of bench/run.py's folder (made when missing) instead of one:
the whole pipeline, start-up included, rather than start-up alone.

The full-size synthetic tag network of bench/run.py (`out/models/tag-he1.safetensors`, built by it when missing,
or --weights) and the first image of its folder (or --image). The other revision is extracted with `git archive`
under `out/startup/` and run from there with the same interpreter, so both use the same packages. Each side
first runs once to fill its own cache (export, optimised graph, weights record: `out/startup/home-*`); then the
rounds alternate the two, so a noisy neighbour slows both alike. CPU time is user + sys of the process and its
children (`wait4`), less noisy than wall time on a shared machine; the 1-minute load average is printed with
each round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from run import run_cli  # bench/run.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
OUT = Path(__file__).resolve().parent / "out"


def extract(rev: str) -> Path:
    """The package at ``rev``, extracted once under out/startup/ (named by its commit: HEAD moves)."""
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", f"{rev}^{{commit}}"],
                            capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    rev = commit
    target = OUT / "startup" / f"rev-{commit}"
    if not (target / "i2v_cli").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as f:
            subprocess.run(["git", "-C", str(ROOT), "archive", rev, "i2v_cli", "tag_list.json"], stdout=f, check=True)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(target, filter="data")
        link = target / "i2v_cli" / "tag_list.json"  # a link to ../tag_list.json in the repository
        if link.is_symlink():
            link.unlink()
            link.write_bytes((target / "tag_list.json").read_bytes())
    return target


def run_once(code_dir: Path, home: Path, images: list[Path], weights: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `python -m i2v_cli tag IMAGES -w WEIGHTS -o ...` run from ``code_dir``."""
    cmd = [sys.executable, "-m", "i2v_cli", "tag", *map(str, images), "-w", str(weights), "-o", str(home / "out.jsonl")]
    return run_cli(cmd, env={"I2V_HOME": str(home), "PYTHONPATH": str(code_dir)}, cwd=code_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", default="HEAD~3", help="the other revision (default HEAD~3)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--weights", type=Path, default=OUT / "models" / "tag-he1.safetensors")
    parser.add_argument("--image", type=Path, help="default: the first image of bench/run.py's folder")
    parser.add_argument("--images", type=int, default=1, help="tag this many of the folder's images (default 1)")
    args = parser.parse_args()
    folder = OUT / f"images-{max(48, args.images)}"
    if not args.weights.is_file() or (args.image is None and not folder.is_dir()):  # bench/run.py's, made once
        subprocess.run([sys.executable, str(Path(__file__).with_name("run.py")), "--child", "setup",
                        str(max(48, args.images))], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    images = [args.image] if args.image else sorted(folder.iterdir())[: args.images]
    sides = {"this": ROOT, args.against: extract(args.against)}
    homes = {name: OUT / "startup" / f"home-{i}" for i, name in enumerate(sides)}
    for home in homes.values():
        home.mkdir(parents=True, exist_ok=True)
    for name, code in sides.items():
        run_once(code, homes[name], images, args.weights)  # fills the caches
    walls: dict[str, list[float]] = {n: [] for n in sides}
    cpus: dict[str, list[float]] = {n: [] for n in sides}
    print(f"{len(images)} image(s) from {images[0].parent}, weights {args.weights}")
    for r in range(args.rounds):
        line = [f"round {r + 1}: load {os.getloadavg()[0]:.2f}"]
        for name, code in sides.items():
            wall, cpu = run_once(code, homes[name], images, args.weights)
            walls[name].append(wall)
            cpus[name].append(cpu)
            line.append(f"{name} {wall:.2f} s wall, {cpu:.2f} s CPU")
        print("; ".join(line), flush=True)
    for name in sides:
        w, c = walls[name], cpus[name]
        print(f"{name}: wall median {statistics.median(w):.2f} s (min {min(w):.2f}, max {max(w):.2f}); "
              f"CPU median {statistics.median(c):.2f} s (min {min(c):.2f}, max {max(c):.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
