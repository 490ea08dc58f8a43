"""Sketches: a short summary of each semantic feature that a million images' worth fits in memory.

A feature (4,096 floats, 16 KB) is made unit length, multiplied by a fixed random Gaussian basis (D x 256,
stored in the index so every sketch of one index uses the same one), made unit length again and kept as 256
float16 values (512 bytes). By the Johnson-Lindenstrauss property the cosine of two sketches estimates the
cosine of the two features: for a close pair, ``1 - cos`` is kept within a relative error whose standard
deviation is about ``2 / sqrt(256) = 0.125``, whatever the data. Searches use sketches only to choose
candidates, with a slack that covers that error (:func:`candidate_threshold`), and score the candidates on
the full features, so a reported similarity is always the exact one.

:func:`candidate_pairs` finds every pair of sketches above a threshold without comparing all pairs: an
inverted file (spherical k-means into about ``4 sqrt(N)`` lists; each sketch is stored in its nearest list and
compared with the members of its ``nprobe`` nearest lists), so the work grows as ``N * nprobe * N / lists``
rather than ``N^2``. Nothing here touches the database or prints; matrix products go through NumPy's BLAS.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

#: Values in a sketch.
DIMS = 256
#: Seed of the Gaussian basis a new index draws (the basis itself is stored, so this is only its origin).
SEED = 20150810
#: ``1 - cos`` of a candidate may be this many times ``1 - threshold``: 1.75 covers the sketch's relative error
#: (standard deviation 0.125, a right-skewed tail) with about 6 standard deviations to spare.
SLACK = 1.75
#: Lists each sketch is compared with.
NPROBE = 8
#: Rows of a similarity block computed at once (rows x lists float32 stays near 64 MB).
_BLOCK_CELLS = 16 * 1024 * 1024


def make_basis(dim: int, dims: int = DIMS, seed: int = SEED) -> np.ndarray:
    """A (dim, dims) float32 Gaussian basis, scaled so a unit vector keeps about unit length."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((dim, dims), dtype=np.float32) / np.float32(math.sqrt(dims))).astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row divided by its length (a zero row stays zero)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def sketch(features: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Sketches (N x dims float16, unit length) of features (N x D, any scale); each row's is the same
    whatever the other rows."""
    # In float64, so that the sketch of a row does not depend on how it was computed: a few rows (an index's
    # inserts) go through einsum's own loop (one thread: BLAS's threads cost 10 ms a row on a busy machine),
    # many (an upgrade) through BLAS; the two agree to about 1e-12 before the rounding to float16.
    x = unit_rows(np.asarray(features, np.float64).reshape(-1, basis.shape[0]))
    basis = np.asarray(basis, np.float64)
    projected = np.einsum("ij,jk->ik", x, basis) if len(x) <= 16 else x @ basis
    return unit_rows(projected).astype(np.float16)


def candidate_threshold(min_similarity: float, slack: float = SLACK) -> float:
    """The sketch cosine from which a pair is checked on its full features, for pairs wanted at ``min_similarity``."""
    return 1.0 - slack * (1.0 - min_similarity)


def _as_float(block: np.ndarray) -> np.ndarray:
    return np.asarray(block, np.float32)


def _kmeans(x: np.ndarray, lists: int, rng: np.random.Generator, iterations: int = 6) -> np.ndarray:
    """Spherical k-means centroids (lists x dims, unit length) of a sample of the sketches."""
    sample = _as_float(x[np.sort(rng.choice(len(x), size=min(len(x), 32 * lists), replace=False))])
    centroids = sample[rng.choice(len(sample), size=lists, replace=False)].copy()
    for _ in range(iterations):
        nearest = _nearest(sample, centroids, 1)[:, 0]
        order = np.argsort(nearest, kind="stable")
        counts = np.bincount(nearest, minlength=lists)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        sums = np.add.reduceat(sample[order], starts[counts > 0], axis=0)
        centroids[counts > 0] = sums  # an empty list keeps its centroid
        centroids = unit_rows(centroids)
    return centroids


def _nearest(x: np.ndarray, centroids: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` nearest centroids of each row (N x count), the nearest first."""
    import torch

    out = np.empty((len(x), count), np.int64)
    right = torch.from_numpy(np.ascontiguousarray(centroids.T, np.float32))
    step = max(1, _BLOCK_CELLS // max(1, len(centroids)))
    for start in range(0, len(x), step):
        sims = torch.from_numpy(_as_float(x[start : start + step])) @ right
        out[start : start + step] = torch.topk(sims, count, dim=1).indices.numpy()
    return out


@dataclass(frozen=True)
class Candidates:
    """Candidate pairs of one block of one list: ``pairs`` (K x 2 positions, ``i < j``), or, for a dense block
    (thousands of near-copies of one image), every pair of ``rows`` x ``cols`` left to the caller to score: the
    block's pairs themselves would be gigabytes, the rows and columns are kilobytes."""

    pairs: np.ndarray
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None


def candidate_pairs(
    sketches: np.ndarray,
    threshold: float,
    *,
    nprobe: int = NPROBE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Pairs ``(i, j)`` with ``i < j`` (M x 2 int64, sorted, unique) of sketches whose cosine reaches ``threshold``,
    found through an inverted file; a small set is compared all pairs with all (then every pair is found).
    All of them in memory at once: :func:`candidate_blocks` streams them."""
    n = len(sketches)
    found = [c.pairs[:, 0] * n + c.pairs[:, 1] for c in candidate_blocks(sketches, threshold, nprobe=nprobe,
                                                                         seed=seed, progress=progress)]  # fmt: skip
    codes = np.unique(np.concatenate(found)) if found else np.empty(0, np.int64)
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)


def candidate_blocks(
    sketches: np.ndarray,
    threshold: float,
    *,
    nprobe: int = NPROBE,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    dense: float | None = None,
) -> Iterator[Candidates]:
    """The candidate pairs of :func:`candidate_pairs`, a block at a time, in memory bounded by a few blocks: a
    pair may come twice (from two lists). With ``dense``, a block where at least that share of its askers x
    members cells are candidates comes as ``rows`` x ``cols`` instead of pairs.

    ``progress(done, total)`` is called as lists are searched."""
    n = len(sketches)
    if n < 2:
        return
    lists = max(1, int(4 * math.sqrt(n)))
    if lists <= nprobe or n <= 4096:
        nearest = np.zeros((n, 1), np.int64)
        probes = nearest
        lists = 1
    else:
        centroids = _kmeans(sketches, lists, np.random.default_rng(seed))
        probes = _nearest(sketches, centroids, nprobe)
        nearest = probes[:, :1]
    members = _groups(nearest[:, 0], lists)
    askers = _groups(probes.reshape(-1), lists, repeat=probes.shape[1])
    import torch  # the lists are searched in parallel threads, each with one-threaded products

    table = torch.from_numpy(np.ascontiguousarray(sketches, np.float16))

    def search(c: int) -> list[Candidates]:
        m, q = members[c], askers[c]
        if not len(m) or not len(q):
            return []
        right = table[torch.from_numpy(m)].float().T
        out = []
        step = max(1, _BLOCK_CELLS // len(m))
        for start in range(0, len(q), step):
            rows = q[start : start + step]
            hit = (table[torch.from_numpy(rows)].float() @ right >= threshold).numpy()
            count = int(np.count_nonzero(hit))
            if not count:
                continue
            on_rows, on_cols = hit.any(axis=1), hit.any(axis=0)
            if dense is not None and count >= dense * int(on_rows.sum()) * int(on_cols.sum()):
                out.append(Candidates(np.empty((0, 2), np.int64), rows[on_rows], m[on_cols]))
                continue
            ii, jj = np.nonzero(hit)
            a, b = rows[ii], m[jj]
            keep = a != b
            codes = np.unique(np.minimum(a[keep], b[keep]) * n + np.maximum(a[keep], b[keep]))
            out.append(Candidates(np.stack([codes // n, codes % n], axis=1)))
        return out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    workers = max(1, os.cpu_count() or 1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            window: deque[Future[list[Candidates]]] = deque()
            done = 0
            for c in range(lists + 1):
                if c < lists:
                    window.append(pool.submit(search, c))
                while window and (len(window) > 2 * workers or c == lists):  # at most 2 lists a thread ahead
                    yield from window.popleft().result()
                    done += 1
                    if progress is not None:
                        progress(done, lists)
    finally:
        torch.set_num_threads(threads)


def _groups(labels: np.ndarray, count: int, repeat: int = 1) -> list[np.ndarray]:
    """Row numbers by label: ``out[c]`` holds the rows (``index // repeat``) labelled ``c``, ascending."""
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(count + 1))
    rows = order // repeat
    return [rows[bounds[c] : bounds[c + 1]] for c in range(count)]
