"""A hostile user of the collection commands: read-only index files, indexes that change under a reader,
exact duplicates in their thousands, thresholds at the ends of their range, ``--like`` through a symlink."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from i2v_cli import dupes
from i2v_cli.cli import cli
from i2v_cli.config import NUM_TAGS
from i2v_cli.dupes import find_dupes
from i2v_cli.errors import WriteError
from i2v_cli.index import DamagedIndexError, FileState, Index, IndexDbError

DIM = 64


def _index(path: str, features: np.ndarray) -> Index:
    """A synthetic index: one row a feature, at /c/00000.png, /c/00001.png, ..."""
    idx = Index(path, create=True)
    idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, features.shape[1])
    with idx.transaction():
        for i, f in enumerate(features):
            scores = np.zeros(NUM_TAGS, np.float32)
            scores[-3] = 1.0
            idx.put(FileState(f"/c/{i:05d}.png", 100 + i, i, i.to_bytes(32, "big"), 64, 64, "PNG"), scores, f, None)
    return idx


def _make_version_1(db: str) -> None:
    con = sqlite3.connect(db)
    con.executescript(
        "DROP TABLE sketch_blocks; DROP TABLE sketch_basis; DROP INDEX images_rating; PRAGMA user_version = 1;"
    )
    con.close()


def _unwritable_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection opened from now on may begin a transaction but not write in it, as with a file
    opened read-only (root ignores file permissions, so the test cannot chmod)."""
    connect = sqlite3.connect
    writes = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE, sqlite3.SQLITE_CREATE_TABLE,
              sqlite3.SQLITE_CREATE_INDEX}  # fmt: skip

    def unwritable(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in writes else sqlite3.SQLITE_OK)
        return conn

    monkeypatch.setattr(sqlite3, "connect", unwritable)


def test_a_read_only_version_1_index_opened_to_write_is_a_message(tmp_path, monkeypatch):
    # `i2v index` on a version-1 file it may not write used to end in a traceback (sqlite3.OperationalError from
    # the upgrade); it is an IndexDbError naming the file and the upgrade, and the file stays version 1.
    db = str(tmp_path / "c.db")
    _index(db, np.eye(4, DIM, dtype=np.float32)).close()
    _make_version_1(db)
    _unwritable_connections(monkeypatch)
    with pytest.raises(IndexDbError, match=r"c\.db: cannot write to the index: not authorized \(upgrading it from "
                       r"schema version 1 to 2"):  # fmt: skip
        Index(db)
    monkeypatch.undo()
    with Index(db, readonly=True) as idx:
        assert idx.version == 1 and idx.count() == 4


def test_a_write_to_a_read_only_index_is_a_write_error(tmp_path):
    db = str(tmp_path / "c.db")
    with _index(db, np.eye(4, DIM, dtype=np.float32)) as idx:
        unwritable = pytest.raises(WriteError, match=r"c\.db: cannot write to the index: attempt to write a readonly")
        with unwritable, idx.transaction():
            idx.conn.execute("PRAGMA query_only = ON")  # as a read-only file does: BEGIN works, writes fail
            idx.remove(1)
        idx.conn.execute("PRAGMA query_only = OFF")
        assert idx.count() == 4 and not idx.conn.in_transaction and not idx._pending


def _copies(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` features at scales from 0.01 to 100, then each of them again, bit for bit (copies of one file)."""
    x = rng.standard_normal((n, DIM)).astype(np.float32) * rng.uniform(0.01, 100, (n, 1)).astype(np.float32)
    return np.concatenate([x, x])


@pytest.mark.parametrize("exact_rows", [0, 10_000])
def test_min_similarity_1_finds_every_exact_copy(tmp_path, monkeypatch, exact_rows):
    # The float32 cosine of a feature with itself is 1 - 6e-8 for a third of them, and the sketches' float16
    # cosine 1 - 2e-4: `-s 1.0` found 60% of the exact copies (exact search) and 30% (through sketches).
    monkeypatch.setattr(dupes, "EXACT_ROWS", exact_rows)
    with _index(str(tmp_path / "c.db"), _copies(np.random.default_rng(8), 150)) as idx:
        groups = find_dupes(idx, 1.0)
    assert sorted((g.keep.path, [o.path for o in g.others]) for g in groups) == [
        (f"/c/{i:05d}.png", [f"/c/{i + 150:05d}.png"]) for i in range(150)
    ]
    assert {g.min_similarity for g in groups} == {1.0}


def test_groups_of_keeps_no_list_of_the_pairs():
    # 800 copies of one image are 319,600 pairs: the components took a list of every pair (25 MB here, tens of GB
    # for tens of thousands of copies); they take O(n) memory now.
    import tracemalloc

    n = 800
    pairs = ((i, j, 1.0 - (i + j) * 1e-6) for i in range(n) for j in range(i + 1, n))
    tracemalloc.start()
    try:
        groups = dupes.groups_of(pairs, n + 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert groups == {0: (list(range(n)), 1.0 - (2 * n - 3) * 1e-6)}
    assert peak < 2_000_000


def test_a_threshold_below_what_sketches_can_prune_searches_exactly(tmp_path, monkeypatch):
    # At -s -0.2 or less the sketch threshold is under -1: every pair would be a candidate, all of them held in
    # memory at once (N^2). The exact search streams them instead.
    monkeypatch.setattr(dupes, "EXACT_ROWS", 0)
    monkeypatch.setattr(dupes, "candidate_blocks", lambda *a, **k: pytest.fail("every pair a candidate"))
    x = np.random.default_rng(9).standard_normal((40, DIM)).astype(np.float32)
    with _index(str(tmp_path / "c.db"), x) as idx:
        (group,) = find_dupes(idx, -1.0)
        assert len(group.others) == 39 and -1.0 <= group.min_similarity < 0
        assert find_dupes(idx, -0.2)[0].min_similarity >= -0.2


def _writer_meanwhile(db: str, removed: list[int], failed: list[int]) -> None:
    """Another process's `i2v index` commits: these rows' files are gone, these now fail to decode."""
    with Index(db) as other, other.transaction():
        for row in removed:
            other.remove(row)
        for row in failed:
            other.put(FileState(f"/c/{row - 1:05d}.png", 1, 1, b"e" * 32), None, None, "broken")


@pytest.mark.parametrize("exact_rows", [0, 10_000])
def test_dupes_sees_one_commit_while_an_index_run_writes(tmp_path, monkeypatch, exact_rows):
    # Ids were read in one statement and features and paths in the next ones: a commit in between (a file removed,
    # one re-indexed with an error) crashed the run (KeyError, TypeError).
    db = str(tmp_path / "c.db")
    x = _copies(np.random.default_rng(10), 20)
    monkeypatch.setattr(dupes, "EXACT_ROWS", exact_rows)
    with _index(db, x) as idx:
        want = [(g.keep.path, [o.path for o in g.others]) for g in find_dupes(idx, 0.99)]
    search_pairs, load = dupes.candidate_blocks, dupes.load_features

    def candidates_then_commit(*args, **kwargs):
        out = search_pairs(*args, **kwargs)
        _writer_meanwhile(db, [1, 22], [3, 24])
        return out

    def features_then_commit(*args, **kwargs):
        out = load(*args, **kwargs)
        _writer_meanwhile(db, [1, 22], [3, 24])
        return out

    monkeypatch.setattr(dupes, "candidate_blocks", candidates_then_commit)
    monkeypatch.setattr(dupes, "load_features", features_then_commit)
    with Index(db, readonly=True) as idx:
        got = [(g.keep.path, [o.path for o in g.others]) for g in find_dupes(idx, 0.99)]
        assert got == want and len(want) == 20
        assert not idx.conn.in_transaction
        assert idx.count() == 38  # the next read sees the commit


@pytest.mark.parametrize("exact", [False, True])
def test_like_sees_one_commit_while_an_index_run_writes(tmp_path, monkeypatch, exact):
    from i2v_cli import query

    db = str(tmp_path / "c.db")
    x = _copies(np.random.default_rng(11), 20)
    with _index(db, x) as idx:
        want = [(h.row, h.path) for h in query.search(idx, [], like=x[5], exclude=6, k=3, exact=exact)]
    most_similar = query._most_similar

    def rank_then_commit(*args, **kwargs):
        out = most_similar(*args, **kwargs)
        _writer_meanwhile(db, [26], [])
        return out

    monkeypatch.setattr(query, "_most_similar", rank_then_commit)
    with Index(db, readonly=True) as idx:
        assert [(h.row, h.path) for h in query.search(idx, [], like=x[5], exclude=6, k=3, exact=exact)] == want
        assert want[0] == (26, "/c/00025.png")


def test_like_through_a_symlink_or_a_copy_uses_the_stored_feature(tmp_path, monkeypatch):
    # `--like` matched the exact absolute path only: through a symlinked folder, a symlink or a copy the image
    # was "not indexed", the feature model had to be found and run, and the image itself came back as the
    # best match (1.0). The content's hash finds the row; the row is left out only when it is the same file.
    from i2v_cli.index import file_sha256
    from i2v_cli.query import like_row

    folder = tmp_path / "imgs"
    folder.mkdir()
    x = np.random.default_rng(12).standard_normal((3, DIM)).astype(np.float32)
    db = str(tmp_path / "c.db")
    with Index(db, create=True) as idx:
        idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, DIM)
        with idx.transaction():
            for i in range(3):
                f = folder / f"{i}.png"
                f.write_bytes(b"image %d" % i)
                state = FileState(str(f), f.stat().st_size, f.stat().st_mtime_ns, file_sha256(str(f)), 8, 8, "PNG")
                idx.put(state, np.zeros(NUM_TAGS, np.float32), x[i], None)
    (tmp_path / "link").symlink_to(folder)
    (tmp_path / "one.png").symlink_to(folder / "1.png")
    (tmp_path / "copy.png").write_bytes(b"image 1")
    (tmp_path / "other.png").write_bytes(b"image 9")
    monkeypatch.chdir(tmp_path / "link")
    with Index(db, readonly=True) as idx:
        for name in (str(folder / "1.png"), str(tmp_path / "link" / "1.png"), "1.png", str(tmp_path / "one.png")):
            row, feature = like_row(idx, name)
            assert row == 2 and np.array_equal(feature, x[1]), name
        row, feature = like_row(idx, str(tmp_path / "copy.png"))
        assert row is None and np.array_equal(feature, x[1])
        assert like_row(idx, str(tmp_path / "other.png")) == (None, None)
        assert like_row(idx, str(tmp_path)) == (None, None)


@pytest.mark.parametrize("min_similarity", [0.0, 0.95])
def test_sketches_that_would_leave_most_pairs_give_way_to_the_exact_search(tmp_path, monkeypatch, min_similarity):
    # -s 0.0 on unrelated images, or 0.95 on 300 copies of one: nearly every pair is a candidate, all held in memory
    # and each verified by reading two features from SQLite (5 times slower than the exact search at 2,000 images,
    # 1 GB at 3,000 copies). A sample of the sketches says so, and the exact search runs.
    monkeypatch.setattr(dupes, "EXACT_ROWS", 0)
    monkeypatch.setattr(dupes, "candidate_blocks", lambda *a, **k: pytest.fail("most pairs candidates"))
    rng = np.random.default_rng(13)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    if min_similarity > 0.5:
        x[:] = x[0]
    with _index(str(tmp_path / "c.db"), x) as idx:
        (group,) = find_dupes(idx, min_similarity)
        assert len(group.others) == 299


def test_like_a_folder_or_a_device_says_what_it_is(tmp_path):
    from click.testing import CliRunner

    from i2v_cli.cli import cli

    db = str(tmp_path / "c.db")
    _index(db, np.eye(3, DIM, dtype=np.float32)).close()
    runner = CliRunner()
    for like, what in ((str(tmp_path), "not a file (a folder, a device or a pipe)"), ("/dev/null", "not a file (a "
                       "folder, a device or a pipe)"), (str(tmp_path / "nope.png"), "no such file")):  # fmt: skip
        result = runner.invoke(cli, ["search", "--db", db, "--like", like])
        assert result.exit_code == 2
        assert result.output.splitlines()[-1] == f"Error: --like {like}: {what}, and not an indexed path"


def test_a_feature_without_scores_is_not_sketched(tmp_path):
    # put() stores a feature only with its scores; given a feature alone (a half import) it stored none but still
    # wrote a sketch, so searches through sketches met a row without a feature.
    with _index(str(tmp_path / "c.db"), np.eye(3, DIM, dtype=np.float32)) as idx:
        with idx.transaction():
            idx.put(FileState("/c/00001.png", 1, 1, b"z" * 32), None, np.ones(DIM, np.float32), None)
            idx.put(FileState("/c/new.png", 1, 1, b"n" * 32), None, np.ones(DIM, np.float32), None)
        with_features = [r for (r,) in idx.conn.execute("SELECT id FROM images WHERE feature IS NOT NULL")]
        sketched = [int(i) for ids, _ in idx.sketch_blocks() for i in ids]
        assert sketched == with_features == [1, 3]


def test_exact_pairs_are_listed_a_few_rows_at_a_time():
    # At -s -1 every score of a 2,048-row block is a pair: they were turned into Python lists a block at a time
    # (about 80 bytes a pair: 1.6 GB a block at 10,000 images). The first pair now costs a few rows' worth.
    import tracemalloc

    import torch  # noqa: F401  (similar_pairs imports it: not what is measured)

    unit = np.ones((1500, 4), np.float32) / 2  # 1,124,250 pairs
    pairs = dupes.similar_pairs(unit, -1.0)
    tracemalloc.start()
    try:
        first = next(pairs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first == (0, 1, 1.0)
    assert peak < 10_000_000
    assert sum(1 for _ in pairs) == 1500 * 1499 // 2 - 1


@pytest.mark.parametrize("exact_rows", [0, 10_000])
def test_thousands_of_copies_of_one_file_are_searched_once(tmp_path, monkeypatch, exact_rows):
    # 20,000 copies of one placeholder image among a million were 2e8 candidate pairs (gigabytes, each pair's two
    # features read from SQLite); copies with the same SHA-256 are one row of the search now, a group at 1.0.
    monkeypatch.setattr(dupes, "EXACT_ROWS", exact_rows)
    rng = np.random.default_rng(21)
    x = rng.standard_normal((200, DIM)).astype(np.float32)
    near = x[1] + 0.05 * rng.standard_normal(DIM).astype(np.float32)
    searched = []
    for name in ("candidate_blocks", "similar_edges"):
        real = getattr(dupes, name)
        monkeypatch.setattr(
            dupes, name, lambda vecs, *a, real=real, **k: searched.append(len(vecs)) or real(vecs, *a, **k)
        )
    with _index(str(tmp_path / "c.db"), np.concatenate([x, near[None, :]])) as idx:
        with idx.transaction():
            for i in range(600):
                state = FileState(f"/d/{i:05d}.png", 100, 1000 + i, (0).to_bytes(32, "big"), 64, 64, "PNG")
                idx.put(state, idx.scores(1), x[0], None)
        groups = find_dupes(idx, 0.95)
    assert searched == [201]
    assert [(g.keep.path, len(g.others), g.min_similarity) for g in groups] == [
        ("/c/00000.png", 600, 1.0),
        ("/c/00001.png", 1, groups[1].min_similarity),
    ]
    assert sorted(o.path for o in groups[0].others) == [f"/d/{i:05d}.png" for i in range(600)]
    assert [o.path for o in groups[1].others] == ["/c/00200.png"] and 0.95 <= groups[1].min_similarity < 1


@pytest.mark.parametrize("exact", [True, False])
def test_a_dense_cluster_of_near_copies_is_verified_in_blocks(tmp_path, monkeypatch, exact):
    # 1,500 near-copies of one image (different bytes) are 1.1 million pairs: they were all held as candidates and
    # then passed one Python tuple each (minutes, gigabytes at 20,000 copies). Dense blocks and tiles are scored as
    # one product and give the groups one edge a member.
    monkeypatch.setattr(dupes, "EXACT_ROWS", 0)
    monkeypatch.setattr(dupes, "_MAX_CANDIDATE_SHARE", 1.0)  # at a million images the sample sees 0.04%, not 6%
    monkeypatch.setattr(dupes, "_TILE_COLS", 1024)  # several tiles, diagonal and not
    rng = np.random.default_rng(30)
    x = rng.standard_normal((4500, DIM)).astype(np.float32)
    near = x[0] + 0.05 * rng.standard_normal((1500, DIM)).astype(np.float32)
    consumed = []
    real = dupes.groups_of
    monkeypatch.setattr(dupes, "groups_of", lambda pairs, n: real((consumed.append(p) or p for p in pairs), n))
    with _index(str(tmp_path / "c.db"), np.concatenate([x, near])) as idx:
        _, unit = dupes.load_features(idx)
        reference = real(dupes.similar_pairs(unit, 0.95 - 1e-5), len(unit))  # every pair, one at a time
        got = find_dupes(idx, 0.95, exact=exact)
    ((members, low),) = reference.values()
    assert len(got) == 1 and len(got[0].others) == 1500
    assert sorted(o.row - 1 for o in [got[0].keep, *got[0].others]) == members
    assert got[0].min_similarity == np.float32(low) if exact else got[0].min_similarity >= np.float32(low)
    assert len(consumed) < 50_000


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_dense_edges_give_the_components_and_lows_of_all_the_pairs(data):
    n = data.draw(st.integers(2, 12))
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))), np.int64)
    cols = np.array(sorted(data.draw(st.sets(st.integers(0, n - 1), min_size=1))), np.int64)
    cells = st.sampled_from([0.2, 0.9, 0.95, 0.97, 1.0])
    sims = np.array(data.draw(st.lists(cells, min_size=len(rows) * len(cols), max_size=len(rows) * len(cols))))
    sims = sims.astype(np.float32).reshape(len(rows), len(cols))
    pairs = [(int(min(a, b)), int(max(a, b)), float(sims[i, j])) for i, a in enumerate(rows)
             for j, b in enumerate(cols) if a != b and sims[i, j] >= 0.95]  # fmt: skip
    assert dupes.groups_of(iter(dupes._dense_edges(rows, cols, sims, 0.95)), n) == dupes.groups_of(iter(pairs), n)


def _tagged(path: str, names: list[str]) -> None:
    """An index of ``names``, each with the top rating and every tag at 0.9 but the first (0.1)."""
    from i2v_cli.tags import load_tag_list

    idx = Index(path, create=True)
    idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, DIM)
    scores = np.full(NUM_TAGS, 0.9, np.float32)
    scores[0] = 0.1
    with idx.transaction():
        for i, name in enumerate(names):
            feature = np.ones(DIM, np.float32)
            idx.put(FileState(name, 100 + i, i, i.to_bytes(32, "big"), 64, 64, "PNG"), scores, feature, None)
    idx.close()
    assert len(load_tag_list()) == NUM_TAGS


def test_a_query_of_thousands_of_terms_is_answered(tmp_path):
    """SQLite parses a flat AND chain one level deeper per term: a query of about a thousand terms was a
    traceback ("Expression tree is too large (maximum depth 1000)")."""
    from i2v_cli.tags import load_tag_list

    db = str(tmp_path / "c.db")
    _tagged(db, ["/c/a.png", "/c/b.png"])
    low, *names = [t.replace(" ", "_") for t in load_tag_list()[:512]]
    for query in [" ".join(names * 4), " ".join(f"{n}>=0.5" for n in names * 3), " ".join(["-" + low] * 1500)]:
        result = CliRunner().invoke(cli, ["search", "--db", db, "-k", "3", "--", query])
        assert result.exit_code == 0, result.output[-500:]
        assert result.stdout.splitlines() == ["/c/a.png", "/c/b.png"]


@pytest.mark.parametrize("k", ["99999999999999999999", str(2**63 - 1)])
def test_a_huge_k_means_all_of_them(tmp_path, k):
    """SQLite's LIMIT takes 64-bit integers: it was an OverflowError traceback."""
    db = str(tmp_path / "c.db")
    _tagged(db, ["/c/a.png", "/c/b.png"])
    result = CliRunner().invoke(cli, ["search", "--db", db, "-k", k, "rating:safe"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["/c/a.png", "/c/b.png"]


def test_text_output_keeps_a_path_a_line(tmp_path):
    """A newline in a file name split one path over two lines of `search` and `dupes` text output."""
    db = str(tmp_path / "c.db")
    _tagged(db, ["/c/new\nline.png", "/c/tab\there.png"])
    result = CliRunner().invoke(cli, ["search", "--db", db, "rating:safe"])
    assert result.stdout.splitlines() == ["/c/new\\nline.png", "/c/tab\\there.png"], result.output
    result = CliRunner().invoke(cli, ["dupes", "--db", db])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2 and "new\\nline.png" in result.stdout, result.stdout


@contextlib.contextmanager
def _read_only_media(tmp_path, files: dict[str, str]):
    """A tmpfs holding copies of ``files`` (name -> source), remounted read-only; yields its folder."""
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    media = tmp_path / "media"
    media.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(media)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        for name, source in files.items():
            shutil.copy(source, media / name)
        subprocess.run(["mount", "-o", "remount,ro", str(media)], check=True)
        yield media
    finally:
        subprocess.run(["umount", "-l", str(media)])


def test_an_index_on_read_only_media_is_read(tmp_path):
    """SQLite could not make the -shm file beside it: search, dupes and export said the index "is not an i2v index
    (unable to open database file)"."""
    db = str(tmp_path / "c.db")
    _tagged(db, ["/c/a.png", "/c/b.png"])
    with _read_only_media(tmp_path, {"c.db": db}) as media:
        for args in (["search", "rating:safe"], ["dupes", "-f", "json"]):
            result = CliRunner().invoke(cli, [args[0], "--db", str(media / "c.db"), *args[1:]])
            assert result.exit_code == 0, result.output
        assert CliRunner().invoke(cli, ["search", "--db", str(media / "c.db"), "rating:safe"]).stdout.split() == [
            "/c/a.png", "/c/b.png"]  # fmt: skip


def test_an_index_on_read_only_media_with_a_pending_log_is_refused_not_misread(tmp_path):
    """Read immutable, SQLite skips the -wal file: rows deleted since were listed, rows added since missed, without
    a word (the review's copy listed 9 images of 5)."""
    db = str(tmp_path / "c.db")
    _tagged(db, ["/c/a.png", "/c/b.png", "/c/c.png"])
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("PRAGMA wal_autocheckpoint = 0")
    con.execute("DELETE FROM images WHERE path_text = '/c/c.png'")  # committed, in the -wal only
    try:  # copied while the index is open, as a backup would: the -wal without the -shm
        media_files = {"c.db": db, "c.db-wal": db + "-wal"}
        with _read_only_media(tmp_path, media_files) as media:
            result = CliRunner().invoke(cli, ["search", "--db", str(media / "c.db"), "rating:safe"])
            assert result.exit_code == 2, result.output
            assert "write-ahead log" in result.stderr and result.stdout == ""
    finally:
        con.close()


@pytest.mark.parametrize("column", ["scores", "feature", "both as text"])
@pytest.mark.parametrize(
    "command",
    [
        ["search", "--like", "/c/00001.png"],
        ["search", "1girl>0.000001"],  # a bound below the floor of tag_scores: the scores BLOBs are read
        ["dupes"],
        ["export", "--to", "xmp"],
    ],
)
def test_a_hand_damaged_blob_is_a_one_line_message(tmp_path, column, command):
    # A score or feature BLOB of the wrong length (or not a BLOB) gave numpy's ValueError as a traceback, or
    # SQLite's "user-defined function raised exception"; it is now exit 2 and one line that says what to do.
    db = str(tmp_path / "c.db")
    _index(db, np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)).close()
    con = sqlite3.connect(db)
    if column == "both as text":
        con.execute("UPDATE images SET scores = 'x', feature = 'x' WHERE id = 3")
    else:
        con.execute(f"UPDATE images SET {column} = substr({column}, 1, 10) WHERE id = 3")
    con.commit()
    con.close()
    result = CliRunner().invoke(cli, [command[0], "--db", db, *command[1:]])
    needed = "scores" if command[0] == "export" or "1girl" in command[-1] else "feature"
    if column not in (needed, "both as text"):
        assert result.exit_code in (0, 1), result.output  # the damaged column is not read
        return
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the index holds a damaged" in lines[0] and "into a new --db" in lines[0], lines


def test_a_damaged_score_blob_of_a_row_being_removed_is_a_message(tmp_path):
    db = str(tmp_path / "c.db")
    _index(db, np.eye(4, DIM, dtype=np.float32)).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE images SET scores = x'00' WHERE id = 2")
    con.commit()
    con.close()
    damaged = pytest.raises(DamagedIndexError, match=r"score vector \(1 bytes, not 1,539 values")
    with Index(db) as idx, damaged, idx.transaction():
        idx.remove(2)


DAMAGED_RECORDS = {
    "a path stored as text": "UPDATE images SET path = path_text WHERE id = 3",
    "feature_dim not a number": "UPDATE meta SET value = 'abc' WHERE key = 'feature_dim'",
    "tags not JSON": "UPDATE meta SET value = '[1,2' WHERE key = 'tags'",
    "tags of another length": """UPDATE meta SET value = '["a"]' WHERE key = 'tags'""",
}


@pytest.mark.parametrize("damage", DAMAGED_RECORDS)
@pytest.mark.parametrize(
    "command", [["search", "--like", "/c/00001.png"], ["search", "1girl"], ["dupes"], ["export", "--to", "hydrus"]]
)
def test_a_hand_damaged_record_is_a_one_line_message(tmp_path, damage, command):
    """A path stored as text was a TypeError traceback (bytes(str)); bad meta records were ValueError,
    JSONDecodeError or IndexError tracebacks."""
    db = str(tmp_path / "c.db")
    with _index(db, np.random.default_rng(0).standard_normal((6, DIM)).astype(np.float32)) as idx, idx.transaction():
        if "tags" in damage:
            idx.set_meta("tags", "[]")  # a tags record to damage (this synthetic index relies on the default)
    con = sqlite3.connect(db)
    con.execute(DAMAGED_RECORDS[damage])
    con.commit()
    con.close()
    result = CliRunner().invoke(cli, [command[0], "--db", db, *command[1:]])
    assert result.exit_code in (0, 1, 2), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "damaged" in lines[0] and "into a new --db" in lines[0], lines


def test_damaged_paths_hashes_and_model_records_are_damage_for_the_indexer(tmp_path):
    db = str(tmp_path / "c.db")
    _index(db, np.eye(4, DIM, dtype=np.float32)).close()
    for change, what in [("UPDATE images SET sha256 = 'abc' WHERE id = 2", "content hash"),
                         ("UPDATE images SET path = 42 WHERE id = 2", "path"),
                         ("UPDATE meta SET value = '{bad' WHERE key = 'feature_model'", "feature_model")]:  # fmt: skip
        shutil.copy(db, tmp_path / "d.db")
        con = sqlite3.connect(tmp_path / "d.db")
        con.execute(change)
        con.commit()
        con.close()
        with Index(str(tmp_path / "d.db")) as idx, pytest.raises(DamagedIndexError, match=what):
            idx.known()
            idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, DIM)


@pytest.mark.parametrize(
    "command",
    [["search", "solo"], ["search", "--like", "/c/00001.png"], ["dupes"], ["export", "--to", "hydrus"], ["index"]],
)
def test_an_index_file_damaged_on_disk_is_a_one_line_message(tmp_path, command, golden, tag_weights, feature_weights):
    """Garbage over the file's pages (a bad disk, a partial copy): SQLite's "database disk image is malformed" was a
    traceback with exit 1 from every command."""
    db = str(tmp_path / "c.db")
    _index(db, np.random.default_rng(0).standard_normal((300, DIM)).astype(np.float32)).close()
    with open(db, "r+b") as f:
        f.seek(4096)
        f.write(b"garbage" * 600)
    args = [command[0], *command[1:]]
    if command == ["index"]:
        (tmp_path / "imgs").mkdir()
        shutil.copy(golden / "images" / "sq" / "img000.png", tmp_path / "imgs")
        args = ["index", str(tmp_path / "imgs"), "--tag-weights", str(tag_weights), "--feature-weights",
                str(feature_weights), "-j", "0"]  # fmt: skip
    result = CliRunner().invoke(cli, [*args, "--db", db])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is damaged (database disk image is malformed)" in lines[0], lines


def test_damage_is_told_from_other_sqlite_errors():
    """By SQLite's result code where Python gives it (3.11 on), else by its message; "not authorized" (a read-only
    index's upgrade) is not damage."""
    from i2v_cli.index import damaged

    assert damaged("c.db", sqlite3.DatabaseError("database disk image is malformed")) is not None
    assert damaged("c.db", sqlite3.DatabaseError("file is not a database")) is not None
    assert damaged("c.db", sqlite3.DatabaseError("not authorized")) is None
    assert damaged("c.db", sqlite3.OperationalError("database or disk is full")) is None
