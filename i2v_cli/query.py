"""Searching an index: the booru-style query grammar, tag filters as SQL, and ``--like`` (cosine on the feature).

Grammar: space-separated terms that must all hold.

- ``long_hair`` (or ``"long hair"``): the tag's score is at least the threshold (default 0.5);
- ``tag>=0.8``, ``tag>0.8``, ``tag<=0.2``, ``tag<0.2``: the term's own bound;
- ``-term``: the term does not hold;
- ``rating:safe`` (questionable, explicit): that rating has the highest of the three scores.

Tag names are matched case-insensitively, underscores standing for spaces; an unknown tag is an error naming
the closest tags. Nothing here prints.
"""

from __future__ import annotations

import difflib
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import NUM_TAGS
from .errors import I2VError
from .index import (
    TAG_FLOOR,
    DamagedIndexError,
    Index,
    file_sha256,
    fs_path,
    iter_chunks,
    stored,
    stored_name,
    stored_rows,
)
from .sketch import sketch

_TOKEN = re.compile(r'(?:"[^"]*"|[^\s"])+|"[^"]*$')
_BOUND = re.compile(r"^(?P<tag>.+?)(?P<op>>=|<=|>|<)(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
RATINGS = ("safe", "questionable", "explicit")
#: Rows whose features are scored at a time by ``--like``.
LIKE_CHUNK = 4096
#: Rows whose sketches are scored at a time by ``--like``.
SKETCH_CHUNK = 32768
#: ``--like`` scores at most this many matches (the closest by sketch) on their full features.
RERANK = 2000
#: Threads that score sketch blocks while the main thread reads the next ones.
SCORING_THREADS = 2
#: A path-order walk tests this many rows in the time SQLite fetches and sorts one match (measured at a million
#: images: about 1 us a walked row against 4.6 us a sorted match).
WALK_COST = 4
#: The largest K taken: more results than any index holds.
MAX_K = 1 << 40
#: The most terms a query may hold once repeated ones are dropped: far more than anyone types, while SQLite's time
#: grows with the square of the terms (30,000 took 20 s).
MAX_TERMS = 1000
#: A listing of the first K matches first tests at most this many rows (or 20 K) in path order on their own scores.
WALK_ROWS = 2000


class QueryError(I2VError):
    """A query that cannot be understood: an unknown tag (with the closest ones), a bad bound or rating."""


@dataclass(frozen=True)
class TagTerm:
    """``score(tag) op value``, or its negation."""

    tag: int
    op: str
    value: float
    negate: bool = False


@dataclass(frozen=True)
class RatingTerm:
    """The highest of the three ratings is ``rating`` (or, negated, is not)."""

    rating: str
    negate: bool = False


Term = TagTerm | RatingTerm


def tokens(query: str) -> list[str]:
    """The terms of a query: split on spaces, except inside double quotes (which are then dropped)."""
    out = []
    for m in _TOKEN.finditer(query):
        token = m.group(0)
        if token.count('"') % 2:
            raise QueryError(f"unbalanced double quote in the query: {query!r}")
        out.append(token.replace('"', ""))
    return out


def parse(query: str, tags: Sequence[str], threshold: float = 0.5) -> list[Term]:
    """The terms of ``query`` against the tag list ``tags``; raises QueryError for what cannot be understood."""
    lookup = {t.casefold(): i for i, t in enumerate(tags)}
    terms: list[Term] = []
    for token in tokens(query):
        negate = token.startswith("-") and len(token) > 1 and token.casefold().replace("_", " ") not in lookup
        body = token[1:] if negate else token
        if body.casefold().startswith("rating:"):
            name = body.split(":", 1)[1].casefold()
            if name not in RATINGS:
                raise QueryError(
                    f"unknown rating {name!r} in {token!r}: use {', '.join('rating:' + r for r in RATINGS)}"
                )
            terms.append(RatingTerm(name, negate))
            continue
        name, op, value = body, ">=", threshold
        if body.casefold().replace("_", " ") not in lookup and (m := _BOUND.match(body)):
            name, op, value = m["tag"], m["op"], float(m["value"]) + 0.0  # -0 as 0
            if not 0.0 <= value <= 1.0:
                raise QueryError(f"{token!r}: a score bound is between 0 and 1")
        key = name.casefold().replace("_", " ")
        if key not in lookup:
            raise QueryError(unknown_tag(name, tags))
        terms.append(TagTerm(lookup[key], op, value, negate))
    terms = list(dict.fromkeys(terms))  # a term said twice holds once
    if len(terms) > MAX_TERMS:
        raise QueryError(f"the query holds {len(terms)} different terms; at most {MAX_TERMS} are taken")
    return terms


def unknown_tag(name: str, tags: Sequence[str]) -> str:
    """The message for a tag that is not in the list, naming the closest ones (underscored, as typed in queries)."""
    key = name.casefold().replace("_", " ")
    close = difflib.get_close_matches(key, tags, n=5, cutoff=0.6)
    if not close:
        close = [t for t in tags if key in t][:5]
    hint = f": did you mean {', '.join(t.replace(' ', '_') for t in close)}?" if close else " (no tag is close)"
    return f"unknown tag {name!r}{hint}"


def _negated(op: str) -> str:
    return {">=": "<", ">": "<=", "<": ">=", "<=": ">"}[op]


def where(terms: Sequence[Term], *, rowwise: bool = False) -> tuple[str, list[object]]:
    """An SQL condition on ``images`` for the terms (always excludes rows without results), and its parameters.

    ``score >= v`` / ``score > v`` with ``v`` at or above the index's floor is a range of the ``tag_scores``
    primary key; ``<`` / ``<=`` are its complement. A bound below the floor reads each row's ``scores`` BLOB, and
    so does every bound with ``rowwise``: a test of one row at a time, for a walk that stops early.
    """
    clauses, params = ["images.error IS NULL"], []
    for term in terms:
        if isinstance(term, RatingTerm):
            clauses.append("images.rating " + ("!=" if term.negate else "=") + " ?")
            params.append(term.rating)
            continue
        op = _negated(term.op) if term.negate else term.op
        bound = float(np.float32(term.value))
        if bound < TAG_FLOOR or rowwise:
            clauses.append(f"i2v_score(images.scores, ?) {op} ?")
        else:
            upper = op in ("<", "<=")
            clauses.append(
                f"images.id {'NOT IN' if upper else 'IN'} "
                f"(SELECT image FROM tag_scores WHERE tag = ? AND score {_negated(op) if upper else op} ?)"
            )
        params.extend([term.tag, bound])
    return _all(clauses), params


def _all(clauses: Sequence[str]) -> str:
    """``a AND b AND ...`` nested as a balanced tree: SQLite parses a flat chain one level deeper per term, and
    refused a query of about a thousand terms ("Expression tree is too large (maximum depth 1000)")."""
    if len(clauses) <= 2:
        return " AND ".join(clauses)
    half = len(clauses) // 2
    return f"({_all(clauses[:half])}) AND ({_all(clauses[half:])})"


def _score_function(damage: list[DamagedIndexError]) -> Callable[[object, int], float | None]:
    """The SQL function ``i2v_score(scores, column)``. A damaged score BLOB stops the statement (SQLite then raises
    its vague "user-defined function raised exception"); the reason is kept in ``damage`` to be raised instead."""

    def score(blob: object, column: int) -> float | None:
        if blob is None:  # a row with an error: NULL, which no bound holds for
            return None
        if not isinstance(blob, bytes) or len(blob) != 4 * NUM_TAGS:
            try:
                stored(blob, "score vector", NUM_TAGS)
            except DamagedIndexError as exc:
                damage.append(exc)
            raise ValueError("a damaged score BLOB")
        return float(np.frombuffer(blob, np.float32, count=1, offset=4 * column)[0])

    return score


@dataclass
class Hit:
    """One result: the row, its exact path, and the cosine similarity with ``--like`` (None without)."""

    row: int
    path: str
    score: float | None = None


def search(
    index: Index,
    terms: Sequence[Term],
    *,
    like: np.ndarray | None = None,
    exclude: int | None = None,
    k: int | None = None,
    exact: bool = False,
) -> list[Hit]:
    """The rows matching every term: in path order (the first ``k``), or with ``like`` (a feature) the ``k``
    most similar by cosine, most similar first (ties by row), leaving out row ``exclude``.

    With ``like``, when more than :data:`RERANK` rows match, the matches are ranked by their sketches and the
    best :data:`RERANK` are scored on their full features (``exact=True`` scores every match on its feature:
    slower, but no ranking error); the similarities returned are always the full features' cosines."""
    damage: list[DamagedIndexError] = []
    index.conn.create_function("i2v_score", 2, _score_function(damage), deterministic=True)
    if k is not None:
        k = min(k, MAX_K)  # "all of them": SQLite's LIMIT takes 64-bit integers only
    try:
        with index.snapshot():  # ids, sketches, features and paths of one commit, while `i2v index` writes
            if like is None:
                return _listing(index, terms, k)
            return _like(index, terms, like, exclude, k, exact)
    except sqlite3.OperationalError as exc:
        if damage:
            raise damage[0] from None
        if not any(word in str(exc) for word in ("too large", "too many", "too big", "too complex", "overflow")):
            raise
        raise QueryError(f"the query is too large for SQLite ({len(terms)} terms: {exc}): use fewer") from None


def _listing(index: Index, terms: Sequence[Term], k: int | None) -> list[Hit]:
    """The matches in path order (the first ``k``), by the cheapest of three plans:

    - the first ``k`` of many matches: the path index walked in order, each row tested on its own scores, for at
      most :data:`WALK_ROWS` rows (``solo`` at a million images: 1 ms, where sorting its 600,000 matches by path
      took 1.8 s);
    - many matches: a bitmap of the matches read from the indexes, and the path index walked against it;
    - few matches: fetched through the indexes and sorted by SQLite.
    """
    if k is not None:
        hits = _walk(index, terms, k, max(WALK_ROWS, 20 * k))
        if hits is not None:
            return hits
    mask = _match_mask(index, terms)
    matches = int(np.count_nonzero(mask))
    rows = len(mask)  # an upper bound on the rows (ids never reused below the largest are few)
    walk = rows if k is None else min(rows, k * rows // max(matches, 1))
    if walk > WALK_COST * matches:
        cond, params = where(terms)
        sql = f"SELECT id, path FROM images WHERE {cond} ORDER BY path" + (" LIMIT ?" if k else "")
        found = index.conn.execute(sql, [*params, *([k] if k else [])])
        return [Hit(i, stored_name(p)) for i, p in found]
    flags = mask.tobytes()  # indexing bytes gives a Python int: the fastest per-row test from Python
    hits = []
    for i, p in index.conn.execute("SELECT id, path FROM images ORDER BY path"):  # the path index, in order
        if i < rows and flags[i]:
            hits.append(Hit(i, stored_name(p)))
            if k is not None and len(hits) >= k:
                break
    return hits


def _walk(index: Index, terms: Sequence[Term], k: int, limit: int) -> list[Hit] | None:
    """The first ``k`` matches in path order if they lie within the first ``limit`` rows, else None."""
    cond, params = where(terms, rowwise=True)
    cursor = index.conn.execute(f"SELECT id, path, {cond} FROM images ORDER BY path LIMIT ?", [*params, limit])
    hits, walked = [], 0
    for i, p, ok in cursor:
        walked += 1
        if ok:
            hits.append(Hit(i, stored_name(p)))
            if len(hits) >= k:
                return hits
    return hits if walked < limit else None  # the whole index was walked: these are all the matches


def _like(
    index: Index,
    terms: Sequence[Term],
    like: np.ndarray,
    exclude: int | None,
    k: int | None,
    exact: bool,
) -> list[Hit]:
    query = np.asarray(like, np.float32)
    norm = float(np.linalg.norm(query.astype(np.float64)))
    unit = query / max(norm, np.finfo(np.float32).tiny)
    k = k or 10
    chunks: Iterable[list[tuple[Any, ...]]]
    basis = None if exact else index.basis
    if basis is not None:
        if unit.shape[0] != basis.shape[0]:
            raise QueryError(f"the query feature has {unit.shape[0]} values, the index's {basis.shape[0]}")
        rows = _sketch_candidates(index, terms, sketch(unit[None, :], basis)[0], exclude, max(RERANK, 20 * k))
        chunks = index.feature_rows(rows)
    else:
        cond, params = where(terms)
        cursor = index.conn.execute(f"SELECT id, feature FROM images WHERE {cond}", params)
        chunks = iter_chunks(cursor, LIKE_CHUNK)
    best_rows, best = _most_similar(chunks, unit, exclude, k)
    paths = dict(_paths(index, best_rows.tolist()))
    return [Hit(int(r), paths[int(r)], float(s)) for r, s in zip(best_rows, best, strict=True)]


def _sketch_candidates(
    index: Index, terms: Sequence[Term], query: np.ndarray, exclude: int | None, count: int
) -> list[int]:
    """The ``count`` matching rows whose sketches are closest to the query's (all matches when fewer).

    The sketches are read here while threads score the blocks already read (NumPy and BLAS let go of the GIL):
    reading and scoring a million sketches overlap on two cores instead of adding up."""
    query = query.astype(np.float32)
    mask = _match_mask(index, terms) if terms else None
    if exclude is not None and mask is not None and 0 <= exclude < len(mask):
        mask[exclude] = False

    def score(ids: np.ndarray, vecs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if mask is not None:
            keep = mask[np.minimum(ids, len(mask) - 1)] & (ids < len(mask))
        else:
            keep = ids != exclude if exclude is not None else None
        if keep is not None and not keep.all():
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs.astype(np.float32) @ query

    rows = np.empty(0, np.int64)
    sims = np.empty(0, np.float32)
    with ThreadPoolExecutor(SCORING_THREADS) as pool:
        # Every block is handed over as it is read: scoring keeps up with reading, so few wait (peak RSS 0.11 GB at
        # a million images); a window that waited for results before reading on took 1.2 s instead of 0.7.
        pending = [pool.submit(score, ids, vecs) for ids, vecs in index.sketch_blocks()]
        for done in pending:
            ids, part = done.result()
            rows = np.concatenate([rows, ids])
            sims = np.concatenate([sims, part])
            if len(rows) > 4 * count:
                keep = np.argpartition(-sims, count - 1)[:count]
                rows, sims = rows[keep], sims[keep]
    if len(rows) > count:
        rows = rows[np.argpartition(-sims, count - 1)[:count]]
    return sorted(rows.tolist())


def _match_mask(index: Index, terms: Sequence[Term]) -> np.ndarray:
    """A bitmap over row ids (index = id): True for the rows with results that match every term. Built from the
    id sets of :func:`_id_constraints`, which read only the indexes, never the wide ``images`` rows."""
    (top,) = index.conn.execute("SELECT max(id) FROM images").fetchone()
    mask = np.ones((top or 0) + 1, bool)
    mask[0] = False  # SQLite's row ids start at 1
    mask[_id_set(index, "SELECT id AS v FROM images WHERE rating IS NULL", ())] = False  # errors: no results
    for allowed, positive in _id_constraints(index, terms):
        allowed = allowed[allowed < len(mask)]
        if positive:
            inside = np.zeros_like(mask)
            inside[allowed] = True
            mask &= inside
        else:
            mask[allowed] = False
    return mask


def _id_constraints(index: Index, terms: Sequence[Term]) -> list[tuple[np.ndarray, bool]]:
    """The terms as sets of row ids, each one the rows must be in (True) or out of (False); read
    from the indexes of ``tag_scores`` and ``images.rating``, never from the wide ``images`` rows. A bound below
    the index's floor, which only the ``scores`` BLOBs answer, is one SQL scan of ``images``."""
    out = []
    counts: dict[str, int] | None = None
    for term in terms:
        if isinstance(term, RatingTerm):
            if counts is None:  # one pass over the rating index: which side of a rating term is the smaller set
                counts = dict(index.conn.execute("SELECT rating, count(*) FROM images GROUP BY rating").fetchall())
            others = [r for r in RATINGS if r != term.rating]
            if 2 * counts.get(term.rating, 0) <= sum(n for r, n in counts.items() if r is not None):
                sql, params = "SELECT id AS v FROM images WHERE rating = ?", [term.rating]
                positive = not term.negate
            else:  # e.g. rating:safe in a mostly safe collection: the rows out of the other two ratings
                sql, params = "SELECT id AS v FROM images WHERE rating IN (?, ?)", others
                positive = term.negate
        else:
            op = _negated(term.op) if term.negate else term.op
            bound = float(np.float32(term.value))
            if bound < TAG_FLOOR:
                sql = f"SELECT id AS v FROM images WHERE i2v_score(images.scores, ?) {op} ?"
                params = [term.tag, bound]
                positive = True
            else:
                positive = op in (">=", ">")
                sql = f"SELECT image AS v FROM tag_scores WHERE tag = ? AND score {op if positive else _negated(op)} ?"
                params = [term.tag, bound]
        out.append((_id_set(index, sql, params), positive))
    return out


def _id_set(index: Index, sql: str, params: Sequence[object]) -> np.ndarray:
    """The ids one query returns (in its order). Joined into one string by SQLite and parsed by NumPy: a million
    ids in a fraction of a second, where a Python loop over the rows took seconds."""
    (text,) = index.conn.execute(f"SELECT group_concat(v) FROM ({sql})", params).fetchone()
    if not text:
        return np.empty(0, np.int64)
    return np.fromstring(text, dtype=np.int64, sep=",")


def _most_similar(
    chunks: Iterable[list[tuple[Any, ...]]], unit: np.ndarray, exclude: int | None, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` rows of ``(id, feature)`` chunks most similar to ``unit``, most similar first (ties by row)."""
    best_rows = np.empty(0, np.int64)
    best = np.empty(0, np.float32)
    for chunk in chunks:
        if not chunk:
            continue
        ids = np.fromiter((r[0] for r in chunk), np.int64, len(chunk))
        vecs = stored_rows([r[1] for r in chunk], "feature", None)
        if vecs.shape[1] != unit.shape[0]:
            raise QueryError(f"the query feature has {unit.shape[0]} values, the index's {vecs.shape[1]}")
        # einsum, not a BLAS product: each row's sum in the same order whatever the chunk's size, so --exact and the
        # rerank of the sketch candidates give the same float32 score to the same image (BLAS differed by 1 ulp).
        sims = np.einsum("ij,j->i", vecs, unit) / np.maximum(np.linalg.norm(vecs, axis=1), np.finfo(np.float32).tiny)
        if exclude is not None:
            sims[ids == exclude] = -np.inf
        best_rows = np.concatenate([best_rows, ids])
        best = np.concatenate([best, sims.astype(np.float32)])
        order = np.lexsort((best_rows, -best))[:k]
        best_rows, best = best_rows[order], best[order]
    keep = np.isfinite(best)
    return best_rows[keep], best[keep]


def _paths(index: Index, rows: Sequence[int]) -> Iterator[tuple[int, str]]:
    for row in rows:
        (p,) = index.conn.execute("SELECT path FROM images WHERE id = ?", (row,)).fetchone()
        yield row, stored_name(p)


def like_row(index: Index, path: str) -> tuple[int | None, np.ndarray | None]:
    """The row and stored feature of an indexed file: by its absolute path, else (a symlink, a relative name
    through one, a copy) by its content's SHA-256, so no network runs for it. The row is returned (to leave it
    out of the results) only when it is this very file; (None, None) when no stored feature fits."""
    row = index.conn.execute(
        "SELECT id, feature FROM images WHERE path = ?", (fs_path(os.path.abspath(path)),)
    ).fetchone()
    if row is not None:
        return row[0], None if row[1] is None else stored(row[1], "feature", index.feature_dim)
    if not os.path.isfile(path):
        return None, None
    try:
        digest = file_sha256(path)
    except OSError:
        return None, None
    found: tuple[int | None, np.ndarray | None] = (None, None)
    same = index.conn.execute(
        "SELECT id, path, feature FROM images WHERE sha256 = ? AND feature IS NOT NULL ORDER BY id", (digest,)
    )
    for other, other_path, blob in same:
        try:
            if os.path.samefile(path, stored_name(other_path)):
                return other, stored(blob, "feature", index.feature_dim)
        except OSError:  # that copy is gone or unreadable now: its stored feature still fits this content
            pass
        if found[1] is None:
            found = (None, stored(blob, "feature", index.feature_dim))
    return found
