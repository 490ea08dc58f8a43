"""Near-duplicates in an index: pairs of images whose semantic features have a cosine similarity of at least S,
joined into groups, each with the copy to keep.

Up to :data:`EXACT_ROWS` images (or with ``exact=True``) pairs are found exactly: the features are normalised
and multiplied block by block (``A @ B.T`` with torch, which uses every core), keeping the upper triangle only.
That is ``N^2`` work on N x D floats in memory: hours and 16 GB at a million images. Above it, the sketches
(:mod:`i2v_cli.sketch`, 512 bytes an image) choose candidate pairs through an inverted file, with a slack that
covers the sketches' error, and each candidate is scored on its two full features: a reported pair and its
similarity are always exact, and the recall against the all-pairs search is measured by ``bench/index.py``.
Groups are the connected components of the pairs.

The copy to keep: the largest resolution (width x height), then a lossless format (PNG, BMP, TIFF, GIF), then the
oldest file (mtime), then the path. It only reports: nothing is deleted or moved. Nothing here prints.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .index import Index, iter_chunks, stored, stored_name, stored_rows
from .sketch import DIMS as SKETCH_DIMS
from .sketch import Candidates, candidate_blocks, candidate_threshold, unit_rows
from .writers import path_fields

DEFAULT_MIN_SIMILARITY = 0.95
#: Formats whose files keep every pixel (Pillow's format names): kept before lossy copies of the same size.
LOSSLESS = frozenset({"PNG", "BMP", "TIFF", "GIF", "PPM", "TGA"})
#: Rows of the score matrix computed at once.
BLOCK_ROWS = 2048
#: Columns of a tile of the exact search's scores (rows x columns float32: 64 MB).
_TILE_COLS = 8192
#: A tile with more pairs than this many times its rows + columns gives the groups one edge a member.
_DENSE_EDGES = 4
#: Rows of a block of scores whose pairs are listed at once.
_HIT_ROWS = 32
#: Images up to which every pair of full features is compared; above, sketches choose the candidates.
EXACT_ROWS = 10_000
#: Candidate pairs whose full features are read at once.
_VERIFY_PAIRS = 8192
#: A pair is kept from this much under the threshold: the float32 cosine of two bit-identical features (copies
#: of one file) comes out up to about 1e-6 under 1, and ``-s 1.0`` must find every exact copy.
_ROUNDING = 1e-5
#: The same for sketches (float16): a sketch's cosine with itself is 1 within about 2e-4.
_SKETCH_ROUNDING = 1e-3
#: Above this share of candidate pairs (estimated on a sample) the exact search runs instead: where most pairs are
#: candidates (a low ``-s`` on unrelated images) the inverted file only adds to the all-pairs products. A dense
#: cluster of near-copies stays on the sketches: its blocks are scored as products (at a million images, 20,000
#: near-copies are 0.04% of the pairs; at 220,000 images, 0.8%).
_MAX_CANDIDATE_SHARE = 0.05
_SAMPLE = 1024
#: A block of candidates where this share of its askers x members are pairs is scored as one matrix product.
_DENSE = 0.1
#: Bytes of full features the verification keeps read (a list's members are asked for by all its blocks).
_FEATURE_CACHE = 512 * 1024 * 1024


@dataclass
class Image:
    """What the keep rule needs of one image."""

    row: int
    path: str
    width: int
    height: int
    format: str | None
    mtime_ns: int

    def keep_key(self) -> tuple[int, int, int, bytes]:
        """Smaller is better: largest resolution, then lossless, then oldest, then path."""
        return (-(self.width or 0) * (self.height or 0), 0 if self.format in LOSSLESS else 1, self.mtime_ns,
                os.fsencode(self.path))  # fmt: skip


@dataclass
class Group:
    """Near-duplicates: the image to keep and the others, with the lowest similarity of a pair that joined them."""

    keep: Image
    others: list[Image]
    min_similarity: float

    def record(self) -> dict[str, object]:
        """``{"keep", "paths", "min_similarity"}`` (``paths`` holds every copy, the kept one first). Names that
        are not UTF-8 are shown readably, with their exact bytes in ``keep_b64`` / ``paths_b64`` (base64, null
        for a UTF-8 name), as every i2v record does."""
        paths = [self.keep.path, *(o.path for o in self.others)]
        fields = [path_fields("path", p) for p in paths]
        out: dict[str, object] = {**path_fields("keep", self.keep.path), "paths": [f["path"] for f in fields]}
        if any("path_b64" in f for f in fields):
            out["paths_b64"] = [f.get("path_b64") for f in fields]
        out["min_similarity"] = self.min_similarity
        return out


def load_features(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """Row ids and unit-length features (float32, N x D) of every image that has results."""
    ids: list[np.ndarray] = []
    blocks: list[np.ndarray] = []
    cursor = index.conn.execute("SELECT id, feature FROM images WHERE feature IS NOT NULL ORDER BY id")
    for chunk in iter_chunks(cursor, 8192):
        ids.append(np.fromiter((r[0] for r in chunk), np.int64, len(chunk)))
        vecs = stored_rows([r[1] for r in chunk], "feature", index.feature_dim)
        blocks.append(unit_rows(vecs).astype(np.float32))
    if not ids:
        return np.empty(0, np.int64), np.empty((0, index.feature_dim or 0), np.float32)
    return np.concatenate(ids), np.concatenate(blocks)


def _tiles(unit: np.ndarray, block: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """The upper triangle of ``unit @ unit.T`` in tiles ``(first row, first column, block x _TILE_COLS scores)``:
    64 MB each, whatever N (a block of every column was 2,048 x N: 1.8 GB at 220,000 images)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        all_rows = torch.from_numpy(unit)
    n = len(unit)
    for start in range(0, n, block):
        left = all_rows[start : start + block]
        for first in range(start, n, _TILE_COLS):
            yield start, first, (left @ all_rows[first : first + _TILE_COLS].T).numpy()


def similar_pairs(unit: np.ndarray, min_similarity: float, block: int = BLOCK_ROWS) -> Iterator[tuple[int, int, float]]:
    """Every pair ``(i, j, cosine)`` with ``i < j`` of unit rows whose cosine is at least ``min_similarity``."""
    for start, first, sims in _tiles(unit, block):
        yield from _tile_pairs(start, first, sims, min_similarity)


def similar_edges(unit: np.ndarray, min_similarity: float, block: int = BLOCK_ROWS) -> Iterator[tuple[int, int, float]]:
    """What :func:`groups_of` needs of :func:`similar_pairs`: its pairs, except that a tile dense with pairs
    (near-copies by the thousand) gives one edge a member (:func:`_dense_edges`) instead of every pair."""
    for start, first, sims in _tiles(unit, block):
        hits = int(np.count_nonzero(sims >= min_similarity))
        if hits > _DENSE_EDGES * (sims.shape[0] + sims.shape[1]):
            rows = np.arange(start, start + sims.shape[0])
            yield from _dense_edges(rows, np.arange(first, first + sims.shape[1]), sims, min_similarity)
        elif hits:
            yield from _tile_pairs(start, first, sims, min_similarity)


def _tile_pairs(start: int, first: int, sims: np.ndarray, min_similarity: float) -> Iterator[tuple[int, int, float]]:
    # A few rows' hits at a time: at a low threshold nearly every score is a hit, and a tile's hits as Python
    # lists were gigabytes. Only j > i: the upper triangle, without the diagonal.
    for part in range(0, len(sims), _HIT_ROWS):
        ii, jj = np.nonzero(sims[part : part + _HIT_ROWS] >= min_similarity)
        i, j = ii + start + part, jj + first
        for k in np.flatnonzero(j > i).tolist():
            yield int(i[k]), int(j[k]), float(sims[ii[k] + part, jj[k]])


def groups_of(pairs: Iterator[tuple[int, int, float]], n: int) -> dict[int, tuple[list[int], float]]:
    """Connected components of the pairs (union-find): root -> (members, lowest similarity of a pair in it).
    Memory is O(n) whatever the number of pairs (thousands of copies of one image are millions of pairs)."""
    parent = list(range(n))
    low: dict[int, float] = {}  # component root -> its lowest pair so far

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, s in pairs:
        a, b = find(i), find(j)
        root = min(a, b)
        if a != b:
            other = max(a, b)
            parent[other] = root
            s = min(s, low.pop(other, s))
        low[root] = min(low.get(root, 1.0), s)
    members: dict[int, list[int]] = {r: [] for r in low}
    for x in range(n):
        r = find(x)
        if r in members:
            members[r].append(x)
    return {r: (m, low[r]) for r, m in members.items()}


def load_sketches(index: Index) -> tuple[np.ndarray, np.ndarray]:
    """Row ids and sketches (N x sketch.DIMS float16) of every image that has results."""
    blocks = list(index.sketch_blocks())
    if not blocks:
        return np.empty(0, np.int64), np.empty((0, SKETCH_DIMS), np.float16)
    return np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])


def candidate_share(sketches: np.ndarray, threshold: float, sample: int = _SAMPLE) -> float:
    """The share of pairs whose sketch cosine reaches ``threshold``, estimated on a fixed random sample."""
    n = len(sketches)
    if n < 2:
        return 0.0
    rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, sample), replace=False))
    part = np.asarray(sketches[rows], np.float32)
    hits = np.triu(part @ part.T >= threshold, 1).sum()
    return float(hits) / (len(rows) * (len(rows) - 1) / 2)


def verified_pairs(
    index: Index, ids: np.ndarray, pairs: np.ndarray | Iterable[Candidates], min_similarity: float
) -> Iterator[tuple[int, int, float]]:
    """The candidate pairs (positions in ``ids``: an M x 2 array, or :class:`~i2v_cli.sketch.Candidates` blocks)
    whose full features' cosine reaches ``min_similarity``. A dense block (near-copies by the thousand) is scored
    as one matrix product of its rows' and columns' features, and every pair it holds at ``min_similarity`` is
    reported; features are read once while they fit :data:`_FEATURE_CACHE` bytes."""
    features = _FeatureCache(index, ids)
    blocks = [Candidates(pairs)] if isinstance(pairs, np.ndarray) else pairs
    waiting: list[np.ndarray] = []
    held = 0
    for block in blocks:
        if block.rows is not None and block.cols is not None:
            sims = features.get(block.rows) @ features.get(block.cols).T
            yield from _dense_edges(block.rows, block.cols, sims, min_similarity)
            continue
        waiting.append(block.pairs)
        held += len(block.pairs)
        if held >= _VERIFY_PAIRS:
            yield from _verify(features, np.concatenate(waiting), min_similarity)
            waiting, held = [], 0
    if waiting:
        yield from _verify(features, np.concatenate(waiting), min_similarity)


def _dense_edges(
    rows: np.ndarray, cols: np.ndarray, sims: np.ndarray, min_similarity: float
) -> Iterator[tuple[int, int, float]]:
    """What the pairs of a dense block (``sims``: rows x cols) at ``min_similarity`` tell the groups, in one edge a
    member: each member joined to the first of its component, at the lowest similarity of a pair in it. Thousands
    of near-copies of one image are millions of pairs; one Python tuple each took minutes."""
    hit = sims >= min_similarity
    hit &= rows[:, None] != cols[None, :]  # an image and itself is not a pair
    if not hit.any():
        return
    nodes, where = np.unique(np.concatenate([rows, cols]), return_inverse=True)
    r, c = where[: len(rows)], where[len(rows) :]
    label = np.arange(len(nodes))
    big = len(nodes)
    while True:  # each node takes the smallest label among its pairs', until none changes (a few rounds)
        before = label.copy()
        np.minimum.at(label, r, np.where(hit, label[c][None, :], big).min(axis=1))
        np.minimum.at(label, c, np.where(hit, label[r][:, None], big).min(axis=0))
        label = label[label]
        if np.array_equal(label, before):
            break
    lows = np.full(len(nodes), np.inf)
    np.minimum.at(lows, label[r], np.where(hit, sims, np.inf).min(axis=1))
    paired = np.zeros(len(nodes), bool)
    paired[r[hit.any(axis=1)]] = True
    paired[c[hit.any(axis=0)]] = True
    for k in np.flatnonzero(paired & (label != np.arange(len(nodes)))).tolist():
        first = int(label[k])
        yield int(nodes[first]), int(nodes[k]), float(lows[first])


def _verify(features: _FeatureCache, pairs: np.ndarray, min_similarity: float) -> Iterator[tuple[int, int, float]]:
    for start in range(0, len(pairs), _VERIFY_PAIRS):
        chunk = pairs[start : start + _VERIFY_PAIRS]
        wanted = np.unique(chunk)
        unit = features.get(wanted)
        a = unit[np.searchsorted(wanted, chunk[:, 0])]
        b = unit[np.searchsorted(wanted, chunk[:, 1])]
        sims = np.einsum("ij,ij->i", a, b)
        for k in np.flatnonzero(sims >= min_similarity).tolist():
            yield int(chunk[k, 0]), int(chunk[k, 1]), float(sims[k])


class _FeatureCache:
    """Unit-length features by position in ``ids``, read from the index and kept while they fit the budget (the
    least recently used go first): the members of a list are asked for by every block of its askers."""

    def __init__(self, index: Index, ids: np.ndarray, budget: int | None = None) -> None:
        self.index, self.ids = index, ids
        self.budget = _FEATURE_CACHE if budget is None else budget
        self.kept: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bytes = 0

    def get(self, positions: np.ndarray) -> np.ndarray:
        """The features of these positions (len x D float32, unit rows), in their order."""
        missing = [p for p in dict.fromkeys(positions.tolist()) if p not in self.kept]
        read = dict(zip(missing, _unit_features(self.index, self.ids[missing]), strict=True)) if missing else {}
        out = np.stack([read[p] if p in read else self.kept[p] for p in positions.tolist()])
        for p in positions.tolist():
            if p in self.kept:
                self.kept.move_to_end(p)
        for p, vec in read.items():
            self.kept[p] = vec
            self.bytes += vec.nbytes
        while self.bytes > self.budget and self.kept:
            self.bytes -= self.kept.popitem(last=False)[1].nbytes
        return out


def _unit_features(index: Index, rows: np.ndarray) -> np.ndarray:
    """Unit-length features of these row ids, in their order."""
    dim = index.feature_dim
    found = {row: stored(blob, "feature", dim) for chunk in index.feature_rows(rows) for row, blob in chunk}
    vecs = np.stack([found[int(r)] for r in rows])
    return unit_rows(vecs).astype(np.float32)


def find_dupes(
    index: Index,
    min_similarity: float = DEFAULT_MIN_SIMILARITY,
    *,
    exact: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[Group]:
    """Groups of near-duplicates in the index, each with the copy to keep, ordered by the kept path.

    ``exact`` compares every pair of full features whatever the size; ``progress(done, total)`` follows the
    candidate search of a large index."""
    with index.snapshot():  # ids, sketches, features and paths all of one commit, while `i2v index` writes
        return _find_dupes(index, min_similarity, exact, progress)


def _find_dupes(
    index: Index, min_similarity: float, exact: bool, progress: Callable[[int, int], None] | None
) -> list[Group]:
    with_features = index.conn.execute("SELECT count(*) FROM images WHERE feature IS NOT NULL").fetchone()[0]
    floor = min_similarity - _ROUNDING
    threshold = candidate_threshold(min_similarity) - _SKETCH_ROUNDING
    # Sketches choose the pairs only where they leave few: not below a sketch cosine of -1 (every pair), nor where a
    # sample says more than 5% of the pairs would be candidates (a low -s on unrelated images).
    sketches = None
    if not (exact or index.basis is None or with_features <= EXACT_ROWS or threshold <= -1.0):
        ids, sketches = load_sketches(index)
        ids, copies, sketches = _without_copies(index, ids, sketches)
        if candidate_share(sketches, threshold) > _MAX_CANDIDATE_SHARE:
            sketches = None
    if sketches is None:
        ids, unit = load_features(index)
        ids, copies, unit = _without_copies(index, ids, unit)
        pairs: Iterator[tuple[int, int, float]] = similar_edges(unit, floor)
    else:
        candidates = candidate_blocks(sketches, threshold, progress=progress, dense=_DENSE)
        pairs = verified_pairs(index, ids, candidates, floor)
    components = groups_of(pairs, len(ids))
    # Files with the same bytes as another one: a group with it, at similarity 1, unless the first of them is in a
    # group already (as any member, not only its root: it was listed in two groups, kept in one, a dupe in another).
    grouped = {m for members, _ in components.values() for m in members}
    for first in copies:
        if first not in grouped:
            components[first] = ([first], 1.0)
    out = []
    for members, low in components.values():
        rows = [int(r) for m in members for r in (ids[m], *copies.get(m, ()))]
        images = [_image(index, r) for r in rows]
        images.sort(key=Image.keep_key)
        # A pair within rounding under the threshold reports the threshold; none reports more than 1.
        out.append(Group(images[0], images[1:], float(np.float32(min(max(low, min_similarity), 1.0)))))
    out.sort(key=lambda g: os.fsencode(g.keep.path))
    return out


def _without_copies(
    index: Index, ids: np.ndarray, vecs: np.ndarray
) -> tuple[np.ndarray, dict[int, list[int]], np.ndarray]:
    """Files with the same content (SHA-256) searched once: ``ids`` and their rows of ``vecs`` without the later
    copies, and for each kept position the row ids of its copies. Twenty thousand copies of one placeholder image
    were 2e8 candidate pairs (gigabytes, each read from SQLite); they are one row now, read from the hash index."""
    found = index.conn.execute(
        "SELECT group_concat(id) FROM images INDEXED BY images_sha256 GROUP BY sha256"
        " HAVING count(*) > 1 AND length(sha256) = 32"
    )
    drop: list[np.ndarray] = []
    later: dict[int, list[int]] = {}
    for (text,) in found:
        rows = np.sort(np.fromstring(text, dtype=np.int64, sep=","))
        pos = np.searchsorted(ids, rows)
        pos = pos[(pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == rows)]  # rows with a feature
        if len(pos) > 1:
            later[int(pos[0])] = ids[pos[1:]].tolist()
            drop.append(pos[1:])
    if not drop:
        return ids, {}, vecs
    keep = np.ones(len(ids), bool)
    keep[np.concatenate(drop)] = False
    position = np.cumsum(keep) - 1  # old position -> new position, for the kept ones
    copies = {int(position[p]): rows for p, rows in later.items()}
    return ids[keep], copies, vecs[keep]


def _image(index: Index, row: int) -> Image:
    path, width, height, fmt, mtime = index.conn.execute(
        "SELECT path, width, height, format, mtime_ns FROM images WHERE id = ?", (row,)
    ).fetchone()
    return Image(row, stored_name(path), width or 0, height or 0, fmt, mtime)
