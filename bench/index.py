"""The index at scale: a synthetic collection through the index's own insert path (no network run), then the
queries of `i2v search` and `i2v dupes`, with the recall of the sketch searches against exact ones.

    .venv/bin/python bench/index.py                   # 1,000,000 images (the issue's size; about 24 GB on disk)
    .venv/bin/python bench/index.py --images 20000    # a reduced run
    .venv/bin/python bench/index.py --reuse           # measure again on the file an earlier run built

Scores are realistic in shape: each image has 25 tags drawn by a Zipf popularity (so ``solo`` is broad and tags
far down the list are selective) with scores 0.3-1, the other tags small (exponential, mean 0.008). Features are
cluster centres plus noise (4,096 floats, 2,000 clusters, same-cluster cosine about 0.8); 1% of the images are
near-copies of an earlier one, with noise drawn so that their cosines spread over 0.93-0.999, across the default
0.95 threshold of ``dupes``. Prints the insert rate; a selective and a broad tag query; ``--like`` with and
without a filter (k=10), by sketch then re-scored, and exact, with the recall at 10; ``dupes`` over the whole
collection and its peak RSS; the recall of its pairs against an exact all-pairs search on a 100k subset; file size.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from i2v_cli.config import NUM_TAGS
from i2v_cli.dupes import find_dupes, load_sketches, similar_pairs, verified_pairs
from i2v_cli.index import FileState, Index
from i2v_cli.query import parse, search
from i2v_cli.sketch import candidate_pairs, candidate_threshold

OUT = Path(__file__).resolve().parent / "out" / "index"
STEP = 2000


def synthetic(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (scores, features) rows."""
    scores = np.minimum(rng.standard_exponential((n, NUM_TAGS), dtype=np.float32) * 0.008, 1.0)
    popularity = np.log(1.0 / np.arange(1, 1537) ** 1.1)
    keys = popularity - np.log(rng.standard_exponential((n, 1536)))  # Gumbel top-k: 25 tags by popularity
    chosen = np.argpartition(-keys, 25, axis=1)[:, :25]
    np.put_along_axis(scores, chosen, rng.uniform(0.3, 1.0, (n, 25)).astype(np.float32), axis=1)
    scores[:, 1536:] = rng.dirichlet([4, 1, 0.5], size=n)
    feats = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim), dtype=np.float32)
    return scores, feats


def build(db: Path, images: int, dim: int) -> None:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((2000, dim), dtype=np.float32) * 2
    insert = 0.0
    with Index(str(db), create=True) as idx:
        idx.check_models({"source": "bench", "sha256": "0"}, {"source": "bench", "sha256": "0"}, dim)
        prev = None
        for first in range(0, images, STEP):
            n = min(STEP, images - first)
            scores, feats = synthetic(rng, n, dim, centres)
            if prev is not None:  # 1% near-copies of the previous chunk's images
                k = max(1, n // 100)
                noise = rng.standard_normal((k, dim), dtype=np.float32) * rng.uniform(0.1, 0.9, (k, 1))
                feats[:k] = prev[:k] + noise.astype(np.float32)
            prev = feats
            start = time.perf_counter()
            with idx.transaction():
                for i in range(n):
                    state = FileState(f"/collection/{first + i:08d}.png", 1000 + i, first + i,
                                      (first + i).to_bytes(32, "big"), 1000, 800, "PNG")  # fmt: skip
                    idx.put(state, scores[i], feats[i], None)
            insert += time.perf_counter() - start
    print(f"insert (the index's put, commits of {STEP}; generating the data not counted): {images} images "
          f"in {insert:.0f} s = {images / insert:.0f} images/s", flush=True)  # fmt: skip


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def queries(idx: Index, exact_like: int) -> None:
    tags = idx.tags
    selective = f"{tags[1400].replace(' ', '_')}>=0.9"
    for label, query, k in (("selective tag query", selective, None), ("broad tag query", "solo", None),
                            ("broad tag query, first 100", "solo", 100)):  # fmt: skip
        terms = parse(query, tags)
        seconds, hits = timed(lambda terms=terms, k=k: search(idx, terms, k=k))
        print(f"{label} {query!r}: {len(hits)} hits in {seconds * 1000:.0f} ms", flush=True)
    for label, query in (("no filter", ""), ("filter 'solo rating:safe'", "solo rating:safe"),
                         ("selective filter", selective)):  # fmt: skip
        terms = parse(query, tags)
        rows = (1, 5003, 400_017 % idx.count(), 777_777 % idx.count(), 123_457 % idx.count())
        seconds = []
        recalls = []
        for n, row in enumerate(rows):
            like = idx.feature(row)
            start = time.perf_counter()
            fast = search(idx, terms, like=like, exclude=row, k=10)
            seconds.append(time.perf_counter() - start)
            if n < exact_like:
                start = time.perf_counter()
                exact = search(idx, terms, like=like, exclude=row, k=10, exact=True)
                exact_s = time.perf_counter() - start
                recalls.append(len({h.row for h in fast} & {h.row for h in exact}) / max(1, len(exact)))
                same = [h.score for h in fast] == [h.score for h in exact]
                print(f"  --like {label}, exact (every match's full feature): {exact_s:.1f} s; "
                      f"recall at 10 of the default {recalls[-1]:.2f}, same scores in order: {same}",
                      flush=True)  # fmt: skip
        recall = np.mean(recalls) if recalls else float("nan")
        print(f"--like, {label} (k=10): median {np.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms "
              f"over {len(rows)} queries; recall at 10 against exact {recall:.3f}", flush=True)  # fmt: skip


def dupes_recall(idx: Index, subset: int, min_similarity: float) -> None:
    """Pairs found through sketches against an exact all-pairs search, on the first ``subset`` images."""
    ids = np.array([r for (r,) in idx.conn.execute("SELECT id FROM images ORDER BY id LIMIT ?", (subset,))])
    all_ids, all_sketches = load_sketches(idx)
    sketches = all_sketches[np.searchsorted(all_ids, ids)]
    del all_sketches
    feats = np.empty((len(ids), idx.feature_dim), np.float32)
    for n, (blob,) in enumerate(idx.conn.execute("SELECT feature FROM images ORDER BY id LIMIT ?", (subset,))):
        feats[n] = np.frombuffer(blob, np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    start = time.perf_counter()
    exact = {(i, j) for i, j, _ in similar_pairs(feats, min_similarity)}
    exact_s = time.perf_counter() - start
    del feats
    start = time.perf_counter()
    cand = candidate_pairs(sketches, candidate_threshold(min_similarity))
    got = {(i, j) for i, j, _ in verified_pairs(idx, ids, cand, min_similarity)}
    fast_s = time.perf_counter() - start
    recall = len(got & exact) / max(1, len(exact))
    print(f"dupes recall on the first {len(ids)} images: {recall:.4f} of {len(exact)} exact pairs "
          f"(found {len(got)}, {len(got - exact)} not in the exact set; {len(cand)} candidates checked); "
          f"exact all-pairs {exact_s:.0f} s, sketches {fast_s:.1f} s", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--reuse", action="store_true", help="measure on the file an earlier run built")
    parser.add_argument("--skip-dupes", action="store_true")
    parser.add_argument("--exact-like", type=int, default=2, help="--like queries also run exactly, per filter")
    parser.add_argument("--subset", type=int, default=100_000, help="images of the dupes recall check")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load {os.getloadavg()}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    db = OUT / f"bench-{args.images}-{args.dim}.db"
    if not (args.reuse and db.exists()):
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        build(db, args.images, args.dim)
    with Index(str(db), readonly=True) as idx:
        queries(idx, args.exact_like)
        print(f"peak RSS so far: {rss_gb():.2f} GB", flush=True)
        if not args.skip_dupes:
            start = time.perf_counter()
            groups = find_dupes(idx, 0.95)
            seconds = time.perf_counter() - start
            found = sum(len(g.others) for g in groups)
            print(f"dupes over {idx.count()} images: {len(groups)} groups ({found} copies) in {seconds:.0f} s; "
                  f"peak RSS {rss_gb():.2f} GB", flush=True)  # fmt: skip
            dupes_recall(idx, min(args.subset, idx.count()), 0.95)
    size = sum(os.path.getsize(f"{db}{s}") for s in ("", "-wal") if os.path.exists(f"{db}{s}"))
    print(f"file size: {size / 1e9:.2f} GB ({size / args.images:.0f} bytes per image); load {os.getloadavg()}")


if __name__ == "__main__":
    main()
