"""``i2v index`` and ``i2v search``: stored results equal `i2v tag`/`i2v features`, incremental runs, a killed run,
the query grammar, schema checks, non-UTF-8 names."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.errors import Interrupted
from i2v_cli.index import SCHEMA_VERSION, TAG_FLOOR, Index, IndexDbError
from i2v_cli.query import QueryError, RatingTerm, TagTerm, parse, tokens
from i2v_cli.tags import load_tag_list
from i2v_cli.writers import record_path

TAGS = load_tag_list()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def weights(tag_weights, feature_weights):
    return ["--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights), "--workers", "0"]


def index(runner, *args, weights):
    return runner.invoke(cli, ["index", *map(str, args), *weights, "--format", "json"])


def search(runner, *args):
    return runner.invoke(cli, ["search", *map(str, args)])


def summary(result):
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.stdout)


@pytest.fixture
def collection(tmp_path, golden):
    """The 12 golden images (sq and mixed) in one folder, named a00 ... a11 in golden order."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    order = (golden / "expected" / "order.txt").read_text().split()
    for i, rel in enumerate(order):
        shutil.copy(golden / rel, folder / f"a{i:02d}{os.path.splitext(rel)[1]}")
    return folder


def rows(db):
    """The index's content without row ids or times: path -> every stored column."""
    con = sqlite3.connect(db)
    out = {}
    for r in con.execute("SELECT path, size, mtime_ns, sha256, width, height, format, error, rating, scores, feature, "
                         "code FROM images"):  # fmt: skip
        out[bytes(r[0])] = tuple(bytes(v) if isinstance(v, bytes) else v for v in r[1:])
    tag_rows = con.execute(
        "SELECT count(*), sum(score) FROM tag_scores JOIN images ON images.id = tag_scores.image"
    ).fetchone()
    con.close()
    return out, tag_rows


# --------------------------------------------------------------------------------------------------------------
# What is stored equals what `i2v tag` and `i2v features` give


def test_index_stores_what_tag_and_features_give(runner, weights, tag_weights, feature_weights, collection, tmp_path):
    db = tmp_path / "c.db"
    assert summary(index(runner, collection, "--db", db, weights=weights)) == {
        "added": 12, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0, "failed": 0}  # fmt: skip
    tagged = runner.invoke(cli, ["tag", str(collection), "-t", "0", "-f", "jsonl", "-w", str(tag_weights), "-j", "0"])
    assert tagged.exit_code == 0, tagged.output
    feats = runner.invoke(cli, ["features", str(collection), "-f", "jsonl", "-w", str(feature_weights), "-j", "0"])
    assert feats.exit_code == 0, feats.output
    with Index(str(db), readonly=True) as idx:
        assert idx.count() == 12
        for line, fline in zip(tagged.stdout.splitlines(), feats.stdout.splitlines(), strict=True):
            record, frecord = json.loads(line), json.loads(fline)
            row = idx.row_id(os.path.abspath(record["path"]))
            want = np.zeros(len(TAGS), np.float32)
            for category in ("general", "character", "copyright", "rating"):
                for tag, score in record[category].items():
                    want[TAGS.index(tag)] = score
            np.testing.assert_array_equal(idx.scores(row), want)
            np.testing.assert_array_equal(idx.feature(row), np.array(frecord["feature"], np.float32))
            code = idx.conn.execute("SELECT code FROM images WHERE id = ?", (row,)).fetchone()[0]
            assert code == np.packbits(np.array(frecord["feature"]) > 0).tobytes()
            w, h = idx.conn.execute("SELECT width, height FROM images WHERE id = ?", (row,)).fetchone()
            from PIL import Image

            with Image.open(record["path"]) as img:
                assert (w, h) == img.size

    # A tag query gives exactly the images whose `i2v tag` record has the tag at the threshold.
    records = [json.loads(line) for line in tagged.stdout.splitlines()]
    for query, threshold, pick in [
        ("solo", 0.5, lambda r: r["general"]["solo"] >= 0.5),
        ("solo -long_hair", 0.3, lambda r: r["general"]["solo"] >= 0.3 and not r["general"]["long hair"] >= 0.3),
        (
            "'solo>=0.6' 'long_hair<0.4'",
            None,
            lambda r: r["general"]["solo"] >= 0.6 and r["general"]["long hair"] < 0.4,
        ),
        ("rating:safe", None, lambda r: max(r["rating"], key=r["rating"].get) == "safe"),
        ("-rating:safe", None, lambda r: max(r["rating"], key=r["rating"].get) != "safe"),
        ("'solo<0.01'", None, lambda r: r["general"]["solo"] < 0.01),  # below the floor: read from the BLOBs
    ]:
        args = ["--db", db, "-f", "jsonl"] + (["-t", threshold] if threshold else []) + ["--", query.replace("'", "")]
        result = search(runner, *args)
        assert result.exit_code == 0, result.output
        got = [json.loads(line)["path"] for line in result.stdout.splitlines()]
        want = sorted(os.path.abspath(r["path"]) for r in records if pick(r))
        assert got == want, query
    assert any(pick(r) for r in records for pick in [lambda r: r["general"]["solo"] >= 0.5])


def test_like_ranks_by_cosine_as_similar_does(runner, weights, feature_weights, collection, tmp_path):
    db = tmp_path / "c.db"
    index(runner, collection, "--db", db, weights=weights)
    vecs = tmp_path / "v.npy"
    assert runner.invoke(cli, ["features", str(collection), "-o", str(vecs), "-w", str(feature_weights),
                               "-j", "0"]).exit_code == 0  # fmt: skip
    query = collection / "a05.png"
    similar = runner.invoke(cli, ["similar", str(query), "--index", str(vecs), "-k", "4", "-f", "jsonl"])
    assert similar.exit_code == 0, similar.output
    want = [(os.path.abspath(r["path"]), r["score"]) for r in json.loads(similar.stdout)["results"]]
    result = search(runner, "--db", db, "--like", query, "-k", 4, "-f", "jsonl")
    assert result.exit_code == 0, result.output
    got = [(r["path"], r["score"]) for r in map(json.loads, result.stdout.splitlines())]
    assert [p for p, _ in got] == [p for p, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
    assert os.path.abspath(query) not in [p for p, _ in got]  # the query itself is left out
    # An image that is not indexed: its feature is computed; the same content ranks its indexed copy first.
    outside = tmp_path / "outside.png"
    shutil.copy(query, outside)
    result = search(runner, "--db", db, "--like", outside, "-k", 2, "-f", "jsonl", "--feature-weights", feature_weights)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["path"] == os.path.abspath(query) and first["score"] == pytest.approx(1.0, abs=1e-6)
    # Filtered by a query: only matching images, still most similar first.
    result = search(runner, "--db", db, "--like", query, "-k", 100, "-f", "jsonl", "--", "-rating:safe")
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    scores = [json.loads(line)["score"] for line in result.stdout.splitlines()]
    assert scores == sorted(scores, reverse=True) and 0 < len(paths) <= 11
    plain = search(runner, "--db", db, "-f", "jsonl", "--", "-rating:safe")
    assert sorted(paths) == sorted(set(json.loads(x)["path"] for x in plain.stdout.splitlines()) - {str(query)})


# --------------------------------------------------------------------------------------------------------------
# Incremental runs


def test_incremental_counts_add_change_move_copy_delete(runner, weights, collection, tmp_path, golden):
    db = tmp_path / "c.db"
    (collection / "broken.png").write_text("not an image")
    first = index(runner, collection, "--db", db, weights=weights)
    assert first.exit_code == 1 and "broken.png" in first.stderr
    assert summary(first) == {"added": 12, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0, "failed": 1}
    with Index(str(db), readonly=True) as idx:
        error = idx.conn.execute("SELECT error, scores FROM images WHERE path_text LIKE '%broken.png'").fetchone()
        assert "not an image" in error[0] and error[1] is None
    # Nothing changed: nothing computed; the broken file is tried again and fails again (exit 1: it is still broken).
    again = index(runner, collection, "--db", db, weights=weights)
    assert again.exit_code == 1 and summary(again) == {
        "added": 0, "updated": 0, "moved": 0, "removed": 0, "unchanged": 12, "failed": 1}  # fmt: skip
    before, _ = rows(db)
    os.rename(collection / "a00.png", collection / "renamed.png")  # moved: same row, new path
    shutil.copy(collection / "a01.png", collection / "copy.png")  # a copy: results copied, no network run
    with open(collection / "a04.png", "ab") as f:  # changed content (bytes after the PNG's end)
        f.write(b"\0")
    os.remove(collection / "a03.jpg")  # deleted
    os.utime(collection / "a05.png", ns=(1, 1))  # touched: same content, new mtime
    (collection / "new.png").write_bytes((golden / "images" / "mixed" / "img003.png").read_bytes() + b"\0")
    result = index(runner, collection, "--db", db, weights=weights)
    # (the broken file, tried again, fails again)
    assert summary(result) == {"added": 2, "updated": 1, "moved": 1, "removed": 1, "unchanged": 9, "failed": 1}
    after, _ = rows(db)
    key = lambda name: os.fsencode(str(collection / name))  # noqa: E731
    assert after[key("renamed.png")][3:] == before[key("a00.png")][3:] and key("a00.png") not in after
    assert after[key("copy.png")][8:] == before[key("a01.png")][8:]
    assert after[key("a04.png")][2] != before[key("a04.png")][2]
    assert key("a03.jpg") not in after and after[key("a05.png")][1] == 1
    # The renamed file kept its row id: a move costs no network run and no new row.
    with Index(str(db), readonly=True) as idx:
        assert idx.row_id(str(collection / "renamed.png")) == 1
        # tag_scores follows the images table exactly
        n = idx.conn.execute("SELECT count(*) FROM tag_scores").fetchone()[0]
        want = sum(int((np.frombuffer(s, np.float32) >= TAG_FLOOR).sum())
                   for (s,) in idx.conn.execute("SELECT scores FROM images WHERE scores IS NOT NULL"))  # fmt: skip
        assert n == want


@pytest.mark.parametrize("shuffle", ["swap", "shift", "cycle"])
def test_names_swapped_or_shifted_keep_each_image_its_own_results(runner, weights, collection, tmp_path, shuffle):
    """Swapping two files' names (or shifting them: a01 to a02, a00 to a01) copied one image's results onto both:
    each copy read its source row after an earlier copy had overwritten it. The index now equals a fresh one."""
    db = tmp_path / "c.db"
    summary(index(runner, collection, "--db", db, weights=weights))
    names = {"swap": ["a01.png", "a02.png"], "shift": ["a01.png", "a02.png", "a04.png", "a05.png"],
             "cycle": ["a05.png", "a01.png", "a02.png"]}[shuffle]  # fmt: skip
    for name in names:
        os.rename(collection / name, collection / f"{name}.tmp")
    # each file takes the next one's name, the last the first's: swap a01 <-> a02; shift a01 -> a02 -> a04 -> a05
    # (-> a01); cycle a05 -> a01 -> a02 (-> a05)
    for name, target in zip(names, names[1:] + names[:1], strict=True):
        os.rename(collection / f"{name}.tmp", collection / target)
    result = summary(index(runner, collection, "--db", db, weights=weights))
    assert result["updated"] == len(names) and result["added"] == 0
    fresh = tmp_path / "fresh.db"
    summary(index(runner, collection, "--db", fresh, weights=weights))
    got, want = rows(db)[0], rows(fresh)[0]
    assert got.keys() == want.keys()
    for path, row in got.items():  # the same content, results within float rounding (another batch position)
        assert row[:8] == want[path][:8]  # size ... rating
        for column in (8, 9):  # scores, feature
            a, b = np.frombuffer(row[column], np.float32), np.frombuffer(want[path][column], np.float32)
            assert np.abs(a - b).max() < 1e-5, (path, column)


def test_killed_run_resumes_to_the_same_index(weights, tag_weights, feature_weights, collection, tmp_path):
    from i2v_cli.cli.index import load_networks
    from i2v_cli.index import update

    model, net, tag_id, feature_id, dim = load_networks(str(tag_weights), str(feature_weights), "cpu", "fp32", "auto")
    paths = sorted(str(p) for p in collection.iterdir())
    whole = tmp_path / "whole.db"
    with Index(str(whole), create=True) as idx:
        idx.check_models(tag_id, feature_id, dim)
        update(idx, paths, model=model, net=net, batch_size=3)
    killed = tmp_path / "killed.db"
    seen = []

    def stop(records):
        seen.append(len(records))
        if len(seen) == 2:
            raise Interrupted(15)

    with Index(str(killed), create=True) as idx:
        idx.check_models(tag_id, feature_id, dim)
        with pytest.raises(Interrupted):
            update(idx, paths, model=model, net=net, batch_size=3, on_batch=stop)
        assert idx.count() == 6  # two committed batches of three
    with Index(str(killed)) as idx:
        s = update(idx, paths, model=model, net=net, batch_size=3)
    assert (s.added, s.unchanged) == (6, 6)
    got, got_tags = rows(killed)
    want, want_tags = rows(whole)
    assert got.keys() == want.keys()
    for k in want:  # mtime and all, except the time of indexing
        assert got[k] == want[k]
    assert got_tags == want_tags


def test_readers_work_while_a_run_writes(tmp_path):
    db = str(tmp_path / "c.db")
    with Index(db, create=True) as writer:
        assert writer.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.conn.execute("BEGIN IMMEDIATE")
        writer.conn.execute("INSERT INTO meta VALUES ('x', 'y')")
        with Index(db, readonly=True) as reader:  # a write transaction is open: reading is not blocked
            assert reader.count() == 0 and reader.meta("x") is None
        writer.conn.execute("COMMIT")


# --------------------------------------------------------------------------------------------------------------
# Names, schema, errors


def test_non_utf8_names_are_kept_exactly(runner, weights, golden, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.png")
    shutil.copy(golden / "images" / "sq" / "img000.png", os.path.join(folder, name))
    db = tmp_path / "c.db"
    assert summary(index(runner, folder, "--db", db, weights=weights))["added"] == 1
    con = sqlite3.connect(db)
    assert bytes(con.execute("SELECT path FROM images").fetchone()[0]).endswith(b"/caf\xe9.png")
    result = search(runner, "--db", db, "-f", "jsonl")
    record = json.loads(result.stdout)
    assert record["path"].endswith("caf\\xe9.png") and record_path(record) == os.path.join(str(folder), name)
    # Rerun: recognised as unchanged by its exact bytes.
    assert summary(index(runner, folder, "--db", db, weights=weights))["unchanged"] == 1


def test_a_file_that_failed_is_tried_again_on_the_next_run(runner, weights, golden, tmp_path):
    """A rerun said "unchanged, failed 0" and exited 0 while the file's row still held its error; and a file
    repaired with its size and mtime kept (cp -p, rsync -t of a good copy) kept its error row for ever."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = (golden / "images" / "sq" / "img000.png").read_bytes()
    target = folder / "a.png"
    target.write_bytes(b"X" + good[1:])  # the same size, not a PNG
    os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    db = tmp_path / "c.db"
    first = index(runner, folder, "--db", db, weights=weights)
    assert first.exit_code == 1 and summary(first)["failed"] == 1
    again = index(runner, folder, "--db", db, weights=weights)
    assert again.exit_code == 1 and summary(again) == {**summary(first), "added": 0, "failed": 1}, again.output
    target.write_bytes(good)  # repaired in place, its mtime put back
    os.utime(target, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    repaired = index(runner, folder, "--db", db, weights=weights)
    assert repaired.exit_code == 0, repaired.output
    assert summary(repaired) == {"added": 0, "updated": 1, "moved": 0, "removed": 0, "unchanged": 0, "failed": 0}
    con = sqlite3.connect(db)
    assert con.execute("SELECT count(*) FROM images WHERE error IS NULL AND scores IS NOT NULL").fetchone() == (1,)
    assert summary(index(runner, folder, "--db", db, weights=weights))["unchanged"] == 1


def test_an_unreadable_file_with_a_non_utf8_name_is_a_failure_not_a_crash(runner, weights, golden, tmp_path):
    """Its error message names the file: stored as it was, it stopped the run with a UnicodeEncodeError from
    SQLite (a traceback, the rest of the batch lost)."""
    folder = tmp_path / os.fsdecode(b"dossier-\xe9")
    folder.mkdir()
    shutil.copy(golden / "images" / "sq" / "img000.png", folder / "good.png")
    (folder / os.fsdecode(b"cass\xe9.png")).write_bytes(b"not an image")
    db = tmp_path / "c.db"
    result = index(runner, folder, "--db", db, weights=weights)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert summary(result) == {"added": 1, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0, "failed": 1}
    assert "cass\\xe9.png" in result.stderr
    con = sqlite3.connect(db)
    (error,) = con.execute("SELECT error FROM images WHERE error IS NOT NULL").fetchone()
    assert "dossier-\\xe9" in error and "cass\\xe9.png" in error


def test_schema_version_and_foreign_files_are_refused(runner, tmp_path):
    db = tmp_path / "c.db"
    Index(str(db), create=True).close()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    result = search(runner, "--db", db)
    assert result.exit_code == 2 and f"schema version {SCHEMA_VERSION + 1}" in result.stderr
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (x)")
    con.close()
    result = search(runner, "--db", other)
    assert result.exit_code == 2 and "not an i2v index" in result.stderr
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 200)
    result = search(runner, "--db", text)
    assert result.exit_code == 2 and "not an i2v index" in result.stderr
    result = search(runner, "--db", tmp_path / "missing.db")
    assert result.exit_code == 2 and "no such index" in result.stderr
    with pytest.raises(IndexDbError):
        Index(str(tmp_path / "missing.db"))


# --------------------------------------------------------------------------------------------------------------
# The query grammar


def test_grammar():
    t = TAGS.index
    assert parse("long_hair", TAGS) == [TagTerm(t("long hair"), ">=", 0.5)]
    assert parse('"long hair" -blue_eyes', TAGS, 0.3) == [
        TagTerm(t("long hair"), ">=", 0.3), TagTerm(t("blue eyes"), ">=", 0.3, negate=True)]  # fmt: skip
    assert parse("Long_Hair>=0.8 solo<0.2 -smile>.7", TAGS) == [
        TagTerm(t("long hair"), ">=", 0.8),
        TagTerm(t("solo"), "<", 0.2),
        TagTerm(t("smile"), ">", 0.7, negate=True),
    ]
    assert parse("rating:safe -rating:explicit", TAGS) == [RatingTerm("safe"), RatingTerm("explicit", negate=True)]
    # Tags that look like syntax: emoticons, operators, apostrophes, colons.
    assert parse(":< >_< :d dragon's_crown fire_emblem:_kakusei", TAGS) == [
        TagTerm(t(x), ">=", 0.5) for x in (":<", "> <", ":d", "dragon's crown", "fire emblem: kakusei")]  # fmt: skip
    assert parse("", TAGS) == [] and tokens('  a  "b c"d ') == ["a", "b cd"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("lnog_hair", "unknown tag 'lnog_hair': did you mean long_hair"),
        ("-blue_eyse", "unknown tag 'blue_eyse': did you mean blue_eyes"),
        ("rating:sfe", "unknown rating 'sfe'"),
        ("solo>=1.5", "between 0 and 1"),
        ("solo>=-0.1", "'solo>=-0.1': a score bound is between 0 and 1"),  # was "unknown tag 'solo>=-0.1'"
        ('"long hair', "unbalanced double quote"),
        ("zzzzqqq", "unknown tag 'zzzzqqq' (no tag is close)"),
    ],
)
def test_grammar_errors(query, message):
    with pytest.raises(QueryError, match=None) as info:
        parse(query, TAGS)
    assert message in str(info.value)


def test_repeated_terms_hold_once_and_the_number_of_terms_is_bounded():
    """30,000 copies of one term (a 360 KB POST to the server) ran SQLite for 20 s, its time growing with the square
    of the terms: a term said twice holds once, and at most MAX_TERMS different ones are taken."""
    from i2v_cli.query import MAX_TERMS

    t = TAGS.index
    assert parse(" ".join(["rating:safe", "long_hair"] * 15000), TAGS) == [
        RatingTerm("safe"), TagTerm(t("long hair"), ">=", 0.5)]  # fmt: skip
    bounds = [f"solo>={i / 10**4:.4f}" for i in range(1, MAX_TERMS + 1)]
    assert len(parse(" ".join(bounds), TAGS)) == MAX_TERMS
    with pytest.raises(QueryError, match=f"holds {MAX_TERMS + 1} different terms; at most {MAX_TERMS} are taken"):
        parse(" ".join([*bounds, "-solo"]), TAGS)


def test_query_error_is_one_line_exit_2(runner, tmp_path):
    db = tmp_path / "c.db"
    Index(str(db), create=True).close()
    result = search(runner, "blu_hair", "--db", db)
    assert result.exit_code == 2
    assert result.stderr.startswith("Error: unknown tag 'blu_hair': did you mean blue_hair")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_missing_weights_are_named_by_the_option_the_command_has(runner, tmp_path, monkeypatch):
    # `i2v search --like` and `i2v index` take --feature-weights / --tag-weights: the message named --weights,
    # an option they do not have.
    monkeypatch.delenv("I2V_WEIGHTS", raising=False)
    monkeypatch.setenv("I2V_HOME", str(tmp_path / "empty-cache"))
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "new.png")
    db = str(tmp_path / "c.db")
    with Index(db, create=True) as idx:
        idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, 8)
    result = runner.invoke(cli, ["search", "--like", str(tmp_path / "new.png"), "--db", db])
    assert result.exit_code == 2 and "no --feature-weights" in result.output, result.output
    result = runner.invoke(cli, ["index", str(tmp_path / "new.png"), "--db", str(tmp_path / "d.db")])
    assert result.exit_code == 2 and "no --tag-weights" in result.output, result.output


def test_a_fifo_is_a_failure_and_a_renamed_broken_file_is_tried_again(runner, weights, golden, tmp_path):
    """A FIFO named like an image blocked the run for ever (hashed before its type was looked at); a broken file
    renamed took its error row along as "moved", with failed 0 and exit status 0."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(golden / "images" / "sq" / "img000.png", folder / "good.png")
    os.mkfifo(folder / "pipe.png")
    (folder / "bad.png").write_text("broken")
    db = tmp_path / "c.db"
    first = index(runner, folder, "--db", db, weights=weights)
    assert first.exit_code == 1 and summary(first)["failed"] == 2, first.output
    assert "pipe.png: not a regular file (a device, pipe or socket), not an image" in first.stderr
    os.remove(folder / "pipe.png")
    os.rename(folder / "bad.png", folder / "bad2.png")
    second = index(runner, folder, "--db", db, weights=weights)
    assert second.exit_code == 1, second.output
    assert summary(second) == {"added": 0, "updated": 0, "moved": 0, "removed": 1, "unchanged": 1, "failed": 1}
    assert "bad2.png" in second.stderr
    con = sqlite3.connect(db)
    errors = [e for (e,) in con.execute("SELECT error FROM images WHERE error IS NOT NULL")]
    assert len(errors) == 1 and "bad2.png" in errors[0]


def test_a_file_replaced_by_a_fifo_or_a_folder_leaves_the_collection(runner, weights, golden, tmp_path):
    """Its row kept the old image's tags and vector: `search` listed a pipe as an image for good."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        shutil.copy(golden / "images" / "sq" / "img000.png", folder / name)
    db = tmp_path / "c.db"
    assert index(runner, folder, "--db", db, weights=weights).exit_code == 0
    os.remove(folder / "a.png")
    os.mkfifo(folder / "a.png")
    os.remove(folder / "b.png")
    (folder / "b.png").mkdir()
    again = index(runner, folder, "--db", db, folder / "b.png", weights=weights)
    assert again.exit_code == 1, again.output
    assert summary(again)["removed"] == 2 and summary(again)["unchanged"] == 1, again.output
    assert "a.png: not a regular file" in again.stderr
    con = sqlite3.connect(db)
    assert [os.path.basename(p) for (p,) in con.execute("SELECT path_text FROM images")] == ["c.png"]


def test_a_bound_in_scientific_notation_is_a_bound():
    """``solo>1e-3`` was read as a tag named "solo>1e-3" (unknown tag)."""
    t = TAGS.index
    assert parse("solo>1e-3 long_hair<=5E-1", TAGS) == [
        TagTerm(t("solo"), ">", 1e-3), TagTerm(t("long hair"), "<=", 0.5)]  # fmt: skip


def test_a_new_index_on_a_full_disk_is_a_write_error_and_leaves_no_file(runner, weights, collection, full_folder):
    """SQLite could not make the tables: exit 2 and an empty new.db left behind, which every later command refused as
    "not an i2v index". Now exit 3, as for a full disk midway, and the half-made file is removed."""
    db = full_folder / "new.db"
    result = index(runner, collection, "--db", db, weights=weights)
    assert result.exit_code == 3, result.output
    assert "database or disk is full (free some space" in result.stderr and "Traceback" not in result.output
    assert not any(p.name.startswith("new.db") for p in full_folder.iterdir())


def test_a_refused_db_leaves_no_job_file_beside_it(runner, weights, collection, tmp_path):
    """`i2v index --db notes.txt` (not an index) was refused, but left an empty .notes.txt.i2v.json beside it."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    result = index(runner, collection, "--db", notes, weights=weights)
    assert result.exit_code == 2, result.output
    assert notes.read_text() == "my notes\n" and not (tmp_path / ".notes.txt.i2v.json").exists()
    db = tmp_path / "c.db"
    assert index(runner, collection, "--db", db, weights=weights).exit_code == 0
    assert (tmp_path / ".c.db.i2v.json").stat().st_size > 0  # a run that began keeps its job file
