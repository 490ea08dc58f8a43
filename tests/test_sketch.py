"""Sketches (the 512-byte summaries a large index searches first): their error stays inside the slack, the
inverted file finds the pairs an all-pairs search finds, the index keeps them in step with the features, a
version-1 index is upgraded, and ``dupes`` / ``search --like`` through sketches equal the exact searches."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from i2v_cli import dupes, query
from i2v_cli.config import NUM_TAGS
from i2v_cli.dupes import find_dupes
from i2v_cli.index import FileState, Index
from i2v_cli.query import parse, search
from i2v_cli.sketch import SLACK, candidate_pairs, candidate_threshold, make_basis, sketch

DIM = 512


def _pairs_at(rng: np.random.Generator, n: int, dim: int, cos: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` pairs of vectors whose cosine is exactly ``cos``."""
    u = rng.standard_normal((n, dim))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = rng.standard_normal((n, dim))
    w -= (w * u).sum(1, keepdims=True) * u
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return u.astype(np.float32), (cos * u + np.sqrt(1 - cos * cos) * w).astype(np.float32)


@pytest.mark.parametrize("cos", [0.9, 0.95, 0.99])
def test_sketch_error_stays_inside_the_slack(cos):
    # A pair at exactly the wanted similarity is a candidate: its sketch cosine reaches candidate_threshold.
    # With no slack (SLACK = 1) about half of them would be missed.
    rng = np.random.default_rng(int(cos * 100))
    a, b = _pairs_at(rng, 3000, 4096, cos)
    basis = make_basis(4096)
    sims = (sketch(a, basis).astype(np.float32) * sketch(b, basis).astype(np.float32)).sum(1)
    assert sims.min() >= candidate_threshold(cos)
    assert (sims < candidate_threshold(cos, slack=1.0)).mean() > 0.3
    assert SLACK == 1.75


def _clustered(rng: np.random.Generator, n: int, dim: int, copies: int) -> np.ndarray:
    centres = rng.standard_normal((n // 40, dim)).astype(np.float32) * 2
    x = centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dim)).astype(np.float32)
    x[-copies:] = x[:copies] + rng.uniform(0.02, 0.2, (copies, 1)).astype(np.float32) * rng.standard_normal(
        (copies, dim)
    ).astype(np.float32)
    return x


def test_inverted_file_finds_the_pairs_an_all_pairs_search_finds():
    # 6,000 sketches: more than the one-list size, so the inverted file (k-means lists, probes) is what runs.
    rng = np.random.default_rng(1)
    x = _clustered(rng, 6000, DIM, 300)
    sk = sketch(x, make_basis(DIM)).astype(np.float32)
    threshold = candidate_threshold(0.95)
    sims = sk @ sk.T
    ii, jj = np.nonzero(np.triu(sims >= threshold, 1))
    want = set(zip(ii.tolist(), jj.tolist(), strict=True))
    got = candidate_pairs(sk.astype(np.float16), threshold)
    assert got.dtype == np.int64 and (got[:, 0] < got[:, 1]).all()
    found = {(int(i), int(j)) for i, j in got}
    assert len(want) >= 300
    assert len(found & want) / len(want) >= 0.99
    # Every pair returned is a real candidate (none invented).
    assert all(sims[i, j] >= threshold - 1e-3 for i, j in found)


def _sketches(idx: Index) -> dict[int, bytes]:
    return {int(i): v.tobytes() for ids, vecs in idx.sketch_blocks() for i, v in zip(ids, vecs, strict=True)}


def _synthetic_index(path: str, features: np.ndarray) -> Index:
    rng = np.random.default_rng(2)
    idx = Index(path, create=True)
    idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, features.shape[1])
    with idx.transaction():
        for i, f in enumerate(features):
            scores = np.zeros(NUM_TAGS, np.float32)
            scores[rng.choice(NUM_TAGS - 3, 5, replace=False)] = rng.uniform(0.3, 1, 5)
            scores[-3:] = rng.dirichlet([3, 1, 1])
            scores[0] = rng.uniform(0, 1)  # one broad tag, for filters that keep about half
            state = FileState(f"/c/{i:05d}.png", 100 + i, i, i.to_bytes(32, "big"), 640 - i % 7, 480, "PNG")
            idx.put(state, scores, f, None)
    return idx


def _groups(groups: list[dupes.Group]) -> list[tuple[str, list[str]]]:
    return [(g.keep.path, sorted(o.path for o in g.others)) for g in groups]


def test_dupes_through_sketches_equals_the_exact_search(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    x = _clustered(rng, 1500, DIM, 60)
    with _synthetic_index(str(tmp_path / "c.db"), x) as idx:
        exact = find_dupes(idx, 0.95, exact=True)
        monkeypatch.setattr(dupes, "EXACT_ROWS", 0)
        calls = []
        monkeypatch.setattr(dupes, "load_features", lambda *a: calls.append(a) or pytest.fail("read every feature"))
        sketched = find_dupes(idx, 0.95)
    assert len(exact) >= 50
    assert _groups(sketched) == _groups(exact)
    # The similarities are the full features' (a dot product instead of a matrix product: float32 rounding).
    assert np.allclose([g.min_similarity for g in sketched], [g.min_similarity for g in exact], rtol=0, atol=1e-6)


def test_like_through_sketches_equals_the_exact_search(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    x = _clustered(rng, 400, DIM, 40)
    with _synthetic_index(str(tmp_path / "c.db"), x) as idx:
        monkeypatch.setattr(query, "RERANK", 50)  # 400 matches: ranked by sketch, the best 50 re-scored
        for row in (1, 7, 30):
            like = idx.feature(row)
            exact = search(idx, [], like=like, exclude=row, k=10, exact=True)
            fast = search(idx, [], like=like, exclude=row, k=10)
            assert [(h.row, h.score) for h in fast] == [(h.row, h.score) for h in exact]
        tag = idx.tags[0].replace(" ", "_")
        for text in ("rating:safe", "-rating:safe", f"{tag}>=0.5", f"{tag}<0.5", f"-{tag}>0.3 -rating:explicit",
                     f"{tag}<0.03", f"{tag}>0.02", f"{tag}>0.7 rating:safe"):  # fmt: skip
            terms = parse(text, idx.tags)
            matches = {h.row for h in search(idx, terms)}
            assert 5 < len(matches) < 395, text
            for row in (1, 7):
                like = idx.feature(row)
                fast = search(idx, terms, like=like, exclude=row, k=5)
                assert {h.row for h in fast} <= matches, text
                assert [h.row for h in fast] == [h.row for h in search(idx, terms, like=like, exclude=row, k=5,
                                                                       exact=True)], text  # fmt: skip


def test_sketches_follow_the_features(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, DIM)).astype(np.float32)
    with _synthetic_index(str(tmp_path / "c.db"), x) as idx:
        with idx.transaction():
            idx.remove(3)
            idx.put(FileState("/c/00005.png", 1, 1, b"x" * 32), None, None, "broken")
            idx.put(FileState("/c/00006.png", 1, 1, b"y" * 32), np.zeros(NUM_TAGS, np.float32), -x[6], None)
        rows = _sketches(idx)
        with_features = [r for (r,) in idx.conn.execute("SELECT id FROM images WHERE feature IS NOT NULL")]
        assert sorted(rows) == sorted(with_features) and len(rows) == 18
        assert np.array_equal(np.frombuffer(rows[7], "<f2"), sketch(idx.feature(7)[None], idx.basis)[0])
        assert np.array_equal(np.frombuffer(rows[7], "<f2"), sketch(x[6:7], idx.basis)[0] * -1)


def test_a_version_1_index_is_read_and_upgraded(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, DIM)).astype(np.float32)
    db = str(tmp_path / "c.db")
    with _synthetic_index(db, x) as idx:
        want = _sketches(idx)
        exact = [h.row for h in search(idx, [], like=x[0], exclude=1, k=5)]
    con = sqlite3.connect(db)
    con.executescript(
        "DROP TABLE sketch_blocks; DROP TABLE sketch_basis; DROP INDEX images_rating; PRAGMA user_version = 1;"
    )
    con.close()
    with Index(db, readonly=True) as old:  # read as it is: searches compare full features
        assert old.version == 1 and old.basis is None
        assert [h.row for h in search(old, [], like=x[0], exclude=1, k=5)] == exact
        assert find_dupes(old, 0.95) == []
    with Index(db) as upgraded:  # opened to write: upgraded in place
        assert upgraded.version == 2
        assert _sketches(upgraded) == want
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    con.close()


def test_search_and_dupes_start_without_torch(tmp_path):
    # No network runs for a tag search, --like on an indexed path, dupes' plumbing or export: torch (2 s to
    # import) is not loaded for them.
    import subprocess
    import sys

    rng = np.random.default_rng(7)
    db = str(tmp_path / "c.db")
    _synthetic_index(db, rng.standard_normal((10, DIM)).astype(np.float32)).close()
    code = (
        "import sys\nfrom i2v_cli.cli import cli\n"
        f"for argv in (['search', '--db', {db!r}, 'solo'], ['search', '--db', {db!r}, '--like', '/c/00001.png'],"
        f" ['export', '--db', {db!r}, '--to', 'hydrus']):\n"
        "    try:\n        cli(argv, prog_name='i2v')\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stderr


def test_writes_outside_a_transaction_keep_their_sketches(tmp_path):
    # A library caller that does not open index.transaction(): each statement commits by itself, and the sketch
    # must be written too (it used to wait for a commit that never came).
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, DIM)).astype(np.float32)
    with _synthetic_index(str(tmp_path / "c.db"), x[:1]) as idx:
        idx.put(FileState("/c/new.png", 1, 1, b"n" * 32), np.zeros(NUM_TAGS, np.float32), x[1], None)
        new = idx.row_id("/c/new.png")
        assert set(_sketches(idx)) == {1, new}
        idx.remove(1)
        assert set(_sketches(idx)) == {new}


def test_a_search_inside_the_writing_transaction_sees_its_own_rows(tmp_path):
    # Sketches wait for the commit; a search in the same transaction read the blocks without them, so --like and
    # dupes missed the rows that SQLite itself already showed to that connection.
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, DIM)).astype(np.float32)
    with _synthetic_index(str(tmp_path / "c.db"), x[:1]) as idx, idx.transaction():
        idx.put(FileState("/c/new.png", 1, 1, b"n" * 32), np.zeros(NUM_TAGS, np.float32), x[1], None)
        new = idx.row_id("/c/new.png")
        assert [h.row for h in search(idx, [], like=x[1], k=1)] == [new]
        assert set(_sketches(idx)) == {1, new}


def test_like_scores_do_not_depend_on_how_the_rows_were_chunked(tmp_path, monkeypatch):
    # --exact scored the matches 4,096 at a time, the rerank 900 at a time: BLAS rounds a row's dot product by the
    # shape of the product, and the same image got scores 1 ulp apart (seen at a million images).
    rng = np.random.default_rng(12)
    x = _clustered(rng, 1000, DIM, 40)
    with _synthetic_index(str(tmp_path / "c.db"), x) as idx:
        for row in (3, 500):
            like = idx.feature(row)
            monkeypatch.setattr(query, "LIKE_CHUNK", 4096)
            whole = search(idx, [], like=like, exclude=row, k=50, exact=True)
            monkeypatch.setattr(query, "LIKE_CHUNK", 37)
            chunked = search(idx, [], like=like, exclude=row, k=50, exact=True)
            fast = search(idx, [], like=like, exclude=row, k=50)
            assert [(h.row, h.score) for h in chunked] == [(h.row, h.score) for h in whole]
            assert [(h.row, h.score) for h in fast] == [(h.row, h.score) for h in whole]
