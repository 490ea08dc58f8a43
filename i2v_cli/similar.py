"""Exact nearest-neighbour search over feature vectors: cosine similarity on float features, Hamming distance
on binary ones.

The index (often a memory-mapped ``.npy``, see :mod:`i2v_cli.features`) is read a chunk of rows at a time:
for float features one matrix product (torch, on the CPU) of the chunk with the normalised queries, divided
by the chunk's row norms,
for binary features XOR and popcount on the packed bits, 64 bits at a time. Each chunk's best ``k`` are found
with ``argpartition`` and merged into the running best, so memory stays bounded by the chunk size whatever
the index holds. Results are exact and deterministic: best score first, ties broken by the lower row. Nothing
here prints.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .writers import short_float

#: Bytes of the index read per step (a view of the memory map, not a copy). Binary chunks stay in cache
#: while every query scans them; float chunks are large to make few matrix products (measured fastest).
FLOAT_CHUNK_BYTES = 128 << 20
BINARY_CHUNK_BYTES = 4 << 20
#: Most entries of the (queries x chunk rows) score matrix held at once; more queries are taken in groups.
MAX_SCORES = 8 << 20

#: Set bits of every byte value: popcount for NumPy without ``np.bitwise_count`` (before 2.0).
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class Neighbors:
    """One query's results, best first: ``rows`` of the index and their ``scores`` (cosine similarity, float32,
    for float features; Hamming distance, int32, for binary features: lower is closer)."""

    rows: np.ndarray
    scores: np.ndarray


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each element of an unsigned integer array (``np.bitwise_count``, or a byte table on NumPy 1)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    return _popcount_table(x)


def _popcount_table(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x)
    counts = _POPCOUNT8[x.view(np.uint8)].reshape(*x.shape, x.dtype.itemsize)
    return counts.sum(axis=-1, dtype=np.uint8)


def hamming(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Hamming distances (queries, rows), int32, between packed-bit uint8 rows of equal width."""
    index = np.ascontiguousarray(index, dtype=np.uint8)
    queries = np.ascontiguousarray(queries, dtype=np.uint8).reshape(-1, index.shape[1])
    word = np.uint64 if index.shape[1] % 8 == 0 else np.uint8
    block, q = index.view(word), queries.view(word)
    out = np.empty((len(q), len(block)), dtype=np.int32)
    if len(block) == 0:
        return out
    xor = np.empty_like(block)
    for i, qi in enumerate(q):  # a loop over queries; the rows are done by whole-array operations
        np.bitwise_xor(block, qi, out=xor)
        np.sum(popcount(xor), axis=1, dtype=np.int32, out=out[i])
    return out


def cosine(index: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Cosine similarities (queries, rows), float32; a zero vector is 0 from everything."""
    block = np.asarray(index, dtype=np.float32)
    q = _unit(np.asarray(queries, dtype=np.float32).reshape(-1, block.shape[1]))
    return _cosine_block(block, q)


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    return (x / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def _cosine_block(block: np.ndarray, unit_queries: np.ndarray) -> np.ndarray:
    # torch's matrix product and norm use every core (NumPy's norm uses one); the tensors share the arrays'
    # memory, a read-only memory map included (only read here, so torch's warning about it does not apply).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rows = torch.from_numpy(block)
    sims = (rows @ torch.from_numpy(unit_queries).T).T
    sims = sims / torch.linalg.vector_norm(rows, dim=1).clamp_min(np.finfo(np.float32).tiny)
    return sims.numpy()


def search(
    index: np.ndarray,
    queries: np.ndarray,
    k: int = 10,
    *,
    exclude: Sequence[int | None] | None = None,
    chunk_rows: int | None = None,
) -> list[Neighbors]:
    """The ``k`` rows of ``index`` closest to each query, exactly.

    ``index`` is (N, D) float (cosine similarity, highest first) or (N, D/8) uint8 packed bits (Hamming
    distance, lowest first), a NumPy array or a memory map; ``queries`` the same width (a single vector is one
    query). ``exclude[i]``, when not None, is a row left out of query ``i``'s results (the query's own row).
    Fewer than ``k`` results come back only when the index has fewer rows. ``chunk_rows`` overrides how many
    index rows are scored at a time.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if index.ndim != 2:
        raise ValueError(f"index must be a 2-D array, not {index.ndim}-D")
    binary = index.dtype == np.uint8
    if not binary and not np.issubdtype(index.dtype, np.floating):
        raise ValueError(f"index must hold float or uint8 (packed bits) vectors, not {index.dtype}")
    queries = np.asarray(queries)
    if queries.ndim == 1:
        queries = queries[None, :]
    if queries.ndim != 2 or queries.shape[1] != index.shape[1]:
        raise ValueError(f"queries must have {index.shape[1]} columns like the index, not shape {queries.shape}")
    if binary and queries.dtype != np.uint8:
        raise ValueError(f"a binary index needs uint8 (packed bits) queries, not {queries.dtype}")
    n_queries, n_rows = len(queries), len(index)
    if exclude is None:
        exclude = [None] * n_queries
    if len(exclude) != n_queries:
        raise ValueError(f"exclude has {len(exclude)} entries for {n_queries} queries")

    if chunk_rows is None:
        row_bytes = index.shape[1] * (1 if binary else 4)
        chunk_rows = max(1, (BINARY_CHUNK_BYTES if binary else FLOAT_CHUNK_BYTES) // max(row_bytes, 1))
    chunk_rows = max(1, min(chunk_rows, max(n_rows, 1)))
    group = max(1, MAX_SCORES // chunk_rows)
    results: list[Neighbors] = []
    for start in range(0, n_queries, group):
        q = queries[start : start + group]
        skip = list(exclude[start : start + group])
        want = min(k + any(r is not None for r in skip), n_rows)
        rows, keys = _scan(index, q, want, binary, chunk_rows)
        for i, row_to_skip in enumerate(skip):
            r, key = rows[i], keys[i]
            keep = r != row_to_skip if row_to_skip is not None else np.ones(len(r), dtype=bool)
            r, key = r[keep][:k], key[keep][:k]
            results.append(Neighbors(r, key if binary else -key))
    return results


def _scan(
    index: np.ndarray, queries: np.ndarray, want: int, binary: bool, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``want`` rows for each query over the whole index, as (rows, keys) sorted by key then row, where the
    key is the Hamming distance or the negated cosine similarity (smaller is better)."""
    n_queries = len(queries)
    key_dtype = np.int32 if binary else np.float32
    best_rows = np.empty((n_queries, 0), dtype=np.int64)
    best_keys = np.empty((n_queries, 0), dtype=key_dtype)
    if want == 0:
        return best_rows, best_keys
    unit = None if binary else _unit(queries.astype(np.float32))
    for start in range(0, len(index), chunk_rows):
        block = np.asarray(index[start : start + chunk_rows])
        if binary:
            keys = hamming(block, queries)
        else:
            keys = _cosine_block(block.astype(np.float32, copy=False), unit)
            np.negative(keys, out=keys)
            np.nan_to_num(keys, copy=False, nan=np.inf)
        rows, top = _smallest(keys, want)
        rows += start
        all_rows = np.concatenate([best_rows, rows], axis=1)
        all_keys = np.concatenate([best_keys, top], axis=1)
        order = np.lexsort((all_rows, all_keys), axis=-1)[:, :want]
        best_rows = np.take_along_axis(all_rows, order, axis=1)
        best_keys = np.take_along_axis(all_keys, order, axis=1)
    return best_rows, best_keys


def _smallest(keys: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``keys`` (queries, n): the columns of the ``m`` smallest keys, ties to the lower column, and
    those keys, both sorted by (key, column)."""
    n = keys.shape[1]
    cols = np.broadcast_to(np.arange(n), keys.shape)
    if m >= n:
        order = np.lexsort((cols, keys), axis=-1)
        return np.take_along_axis(cols, order, axis=1).astype(np.int64), np.take_along_axis(keys, order, axis=1)
    part = np.argpartition(keys, m - 1, axis=1)[:, :m]
    kth = np.take_along_axis(keys, part[:, m - 1 : m], axis=1)
    # argpartition picks arbitrarily among keys equal to the m-th: where there are such ties, take the lowest
    # columns among them instead.
    at_most_kth = np.count_nonzero(keys <= kth, axis=1)
    for i in np.flatnonzero(at_most_kth > m):
        cand = np.flatnonzero(keys[i] <= kth[i, 0])
        part[i] = cand[np.lexsort((cand, keys[i, cand]))[:m]]
    top = np.take_along_axis(keys, part, axis=1)
    order = np.lexsort((part, top), axis=-1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64), np.take_along_axis(top, order, axis=1)


def result_record(
    query: str, own_row: int | None, neighbors: Neighbors, paths: Sequence[str], binary: bool
) -> dict[str, object]:
    """A query's results as a JSON-ready record: ``{"query", "row", "results": [{"row", "path", "score"}]}``
    (``"distance"`` instead of ``"score"`` for binary features; ``row`` is the query's own row or None)."""
    field_name = "distance" if binary else "score"
    results = [
        {"row": int(r), "path": paths[r], field_name: int(s) if binary else short_float(s)}
        for r, s in zip(neighbors.rows.tolist(), neighbors.scores, strict=True)
    ]
    return {"query": query, "row": own_row, "results": results}
