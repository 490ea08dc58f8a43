"""``i2v index --import``: Ray output folders (laid out by ray_engine's own shard writers) load into an index equal
to one that `i2v index` computes; partial tag records (not -t 0) are refused."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.ray_engine import MANIFEST, manifest_cwd, write_feature_shard, write_tag_shard
from i2v_cli.tags import load_tag_list
from i2v_cli.weights import load_weights

TAG0 = load_tag_list()[0]


def _full_record(path: str, **replace: float) -> str:
    """A tag record with all 1,539 scores (0.5), some replaced: as `i2v tag -t 0` writes it."""
    tags, cuts = load_tag_list(), {"general": (0, 512), "character": (512, 1024), "copyright": (1024, 1536),
                                   "rating": (1536, 1539)}  # fmt: skip
    record = {"path": path, **{c: {t: replace.get(t, 0.5) for t in tags[a:b]} for c, (a, b) in cuts.items()}}
    return json.dumps(record) + "\n"


def _moved_record(path: str) -> str:
    """A full record with one general tag listed under character instead."""
    record = json.loads(_full_record(path))
    record["character"][TAG0] = record["general"].pop(TAG0)
    return json.dumps(record) + "\n"


def _write_manifest(folder, command, fmt, shards, model, options):
    manifest = {"format": "i2v-ray-output", "version": 1, "command": command, "output_format": fmt,
                "model": model, "options": options, **manifest_cwd(), "status": "complete",
                "shards": [{"file": f} for f in shards]}  # fmt: skip
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def ray_folders(request, tmp_path, golden, tag_weights, feature_weights, monkeypatch):
    """Ray output folders of a run started in ``tmp_path``, or with ``request.param`` "non-utf8" in a folder whose
    name is not UTF-8 (the records' paths are relative to it)."""
    if getattr(request, "param", "plain") == "non-utf8":
        tmp_path = tmp_path / os.fsdecode(b"caf\xe9")
        tmp_path.mkdir()
    images = tmp_path / "imgs"
    images.mkdir()
    for i, name in enumerate(("sq/img000.png", "sq/img001.png", "mixed/img001.png", "mixed/img003.png")):
        shutil.copy(golden / "images" / name, images / f"r{i}.png")
    (images / "r4.png").write_text("broken")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    src = "./imgs//" if getattr(request, "param", "plain") == "dotted" else "imgs"  # as a user may type it
    tagged = runner.invoke(cli, ["tag", src, "-t", "0", "-f", "jsonl", "-w", str(tag_weights), "-j", "0"])
    feats = runner.invoke(cli, ["features", src, "-f", "jsonl", "-w", str(feature_weights), "-j", "0"])
    tag_records = [json.loads(line) for line in tagged.stdout.splitlines()]
    feature_records = [json.loads(line) for line in feats.stdout.splitlines()]
    for r in feature_records:
        if "feature" in r:
            r["feature"] = np.array(r["feature"], np.float32)
    tag_out, feature_out = tmp_path / "tags_out", tmp_path / "features_out"
    tag_out.mkdir()
    feature_out.mkdir()
    _, tag_info = load_weights(tag_weights)
    _, feature_info = load_weights(feature_weights)
    tag_model = {"source": tag_info.source, "sha256": tag_info.sha256}
    feature_model = {"source": feature_info.source, "sha256": feature_info.sha256}
    names = [write_tag_shard(tag_out, "jsonl", k, tag_records[k * 3 : k * 3 + 3]) for k in range(2)]
    _write_manifest(tag_out, "tag", "jsonl", names, tag_model, {"threshold": 0.0})
    names = [write_feature_shard(feature_out, k, feature_records[k * 3 : k * 3 + 3], dim=128, binary=False,
                                 model=feature_model) for k in range(2)]  # fmt: skip
    _write_manifest(feature_out, "features", "npy", names, feature_model, {"binary": False})
    return tag_out, feature_out, images, tagged


def _content(db):
    con = sqlite3.connect(db)
    rows = con.execute("SELECT path, sha256, error IS NULL, rating, scores, feature, code FROM images ORDER BY path")
    out = [tuple(bytes(v) if isinstance(v, bytes) else v for v in r) for r in rows]
    n = con.execute("SELECT count(*) FROM tag_scores").fetchone()[0]
    con.close()
    return out, n


@pytest.mark.parametrize("ray_folders", ["plain", "non-utf8", "dotted"], indirect=True)
def test_import_equals_a_local_index(ray_folders, tmp_path, tag_weights, feature_weights):
    """Also from a run started in a folder whose name is not UTF-8: its manifest gave the folder as \\xNN text, and
    every record's path joined to it named no file (all "not reachable from here"); and from runs given ``./imgs//``:
    the tag records' paths were normalised, the features' not, and every image was "no feature" (failed)."""
    tag_out, feature_out, images, _ = ray_folders
    runner = CliRunner()
    imported = tmp_path / "imported.db"
    result = runner.invoke(cli, ["index", "--import", str(feature_out), "--import", str(tag_out), "--db",
                                 str(imported), "--format", "json"])  # fmt: skip
    assert result.exit_code == 1 and "r4.png" in result.stderr, result.output  # the broken image
    assert json.loads(result.stdout) == {"added": 4, "updated": 0, "moved": 0, "removed": 0, "unchanged": 0,
                                         "failed": 1}  # fmt: skip
    local = tmp_path / "local.db"
    result = runner.invoke(cli, ["index", str(images), "--db", str(local), "--tag-weights", str(tag_weights),
                                 "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 1
    assert _content(imported) == _content(local)
    # A later local run over the imported index computes nothing: same models, same hashes (the broken image is
    # tried again, and fails again).
    result = runner.invoke(cli, ["index", str(images), "--db", str(imported), "--tag-weights", str(tag_weights),
                                 "--feature-weights", str(feature_weights), "-j", "0", "--format", "json"])  # fmt: skip
    assert json.loads(result.stdout) == {"added": 0, "updated": 0, "moved": 0, "removed": 0, "unchanged": 4,
                                         "failed": 1}  # fmt: skip


def test_import_refuses_partial_tag_records(ray_folders, tmp_path):
    tag_out, feature_out, _, tagged = ray_folders
    records = [json.loads(line) for line in tagged.stdout.splitlines()]
    for r in records:
        if "general" in r:
            r["general"] = {t: s for t, s in r["general"].items() if s >= 0.5}
    write_tag_shard(tag_out, "jsonl", 0, records[:3])
    result = CliRunner().invoke(cli, ["index", "--import", str(tag_out), "--import", str(feature_out), "--db",
                                      str(tmp_path / "x.db")])  # fmt: skip
    assert result.exit_code == 2 and "run `i2v tag -t 0 --engine ray`" in result.stderr
    result = CliRunner().invoke(cli, ["index", "--import", str(tag_out), "--db", str(tmp_path / "y.db")])
    assert result.exit_code == 2 and "needs two folders" in result.stderr


def test_folders_that_cannot_be_imported_leave_no_index_behind(ray_folders, tmp_path):
    """--import of a folder that is not a Ray output was refused, but after the index and its job file were made."""
    tag_out, _, _, _ = ray_folders
    db = tmp_path / "never.db"
    for folders in (["--import", str(tmp_path / "nowhere"), "--import", str(tag_out)], ["--import", str(tag_out)]):
        result = CliRunner().invoke(cli, ["index", *folders, "--db", str(db)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert not db.exists() and not (tmp_path / ".never.db.i2v.json").exists()


@pytest.mark.parametrize("flag", ["-r", "-0"])
def test_path_options_with_import_are_refused(ray_folders, tmp_path, flag):
    tag_out, feature_out, _, _ = ray_folders
    result = CliRunner().invoke(
        cli, ["index", flag, "--import", str(tag_out), "--import", str(feature_out), "--db", str(tmp_path / "x.db")]
    )
    assert result.exit_code == 2 and f"{flag} applies to PATH..., not to --import FOLDER" in result.stderr


def test_import_replaces_an_error_row_with_results_for_the_same_content(ray_folders, tmp_path):
    """A file that failed in an earlier run (a read error, say) keeps its bytes: the import's results take its row
    instead of counting it unchanged."""
    from i2v_cli.index import Index, probe

    tag_out, feature_out, images, _ = ray_folders
    db = tmp_path / "i.db"
    args = ["index", "--import", str(tag_out), "--import", str(feature_out), "--db", str(db), "--format", "json"]
    assert CliRunner().invoke(cli, args).exit_code == 1  # r4.png is broken
    path = str(images / "r0.png")
    with Index(str(db)) as idx, idx.transaction():
        idx.put(probe(path, os.stat(path)), None, None, f"{path}: cannot read the file (Input/output error)")
    result = CliRunner().invoke(cli, args)
    assert json.loads(result.stdout) == {"added": 0, "updated": 1, "moved": 0, "removed": 0, "unchanged": 3,
                                         "failed": 1}  # fmt: skip
    con = sqlite3.connect(db)
    row = con.execute("SELECT error IS NULL, scores IS NOT NULL FROM images WHERE path_text = ?", (path,)).fetchone()
    assert row == (1, 1)


def _edit_manifest(folder, **changes):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "shards not a list": ("tag", {"shards": 5}),
    "shard not an object": ("tag", {"shards": [5]}),
    "shard without a file": ("tag", {"shards": [{}]}),
    "shard file not text": ("tag", {"shards": [{"file": 5}]}),
    "shard file missing": ("tag", {"shards": [{"file": "nope.jsonl"}]}),
    "shard outside the folder": ("tag", {"shards": [{"file": "../x.jsonl"}]}),
    "cwd not text": ("tag", {"cwd": 7}),
    "cwd_b64 not text": ("tag", {"cwd_b64": 3}),
    "cwd_b64 not base64": ("tag", {"cwd_b64": "!!!"}),
    "cwd with a NUL": ("tag", {"cwd_b64": "AAAA"}),
    "parquet over jsonl shards": ("tag", {"output_format": "parquet"}),
    "format not text": ("features", {"output_format": 5}),
    "feature shard missing": ("features", {"shards": [{"file": "nope.npy"}]}),
    "options not an object": ("tag", {"options": "x"}),
    "command not text": ("tag", {"command": ["tag"]}),
    "a line that is not JSON": ("tag", "not json\n"),
    "a record whose path is not text": ("tag", '{"path": 5, "error": "x"}\n'),
    "a record that is not an object": ("tag", "[1, 2]\n"),
    "model not an object": ("tag", {"model": 5}),
    "model without its sha256": ("features", {"model": {"source": "x"}}),
    "a shard listed twice": ("tag", {"shards": [{"file": "part-00000.jsonl"}, {"file": "part-00000.jsonl"}]}),
    "an unknown tag": ("tag", '{"path": "imgs/r0.png", "general": {"zzz_not_a_tag": 0.5}}\n'),
    "a score that is not a number": ("tag", json.dumps({"path": "imgs/r0.png", "general": {TAG0: "abc"}}) + "\n"),
    "a score that is NaN": ("tag", _full_record("imgs/r0.png", **{TAG0: float("nan")})),
    "a category that is not an object": ("tag", '{"path": "imgs/r0.png", "general": [1, 2]}\n'),
    "an error record without its error": ("features", '{"path": "imgs/r0.png", "error": null}\n'),
    "a FIFO beside a feature shard": ("features", "fifo"),
    "a path_b64 that is not base64": ("tag", '{"path": "imgs/r0.png", "path_b64": "!!!", "error": "x"}\n'),
    "a path_b64 that is not text": ("features", '{"path": "imgs/r0.png", "path_b64": 5, "error": "x"}\n'),
    "model tensors not text": ("features", {"model": {"source": "x", "sha256": "y", "tensors": 5}}),
    "a score above 1": ("tag", _full_record("imgs/r3.png", **{TAG0: 5.0})),
    "a score that is true": ("tag", _full_record("imgs/r3.png", **{TAG0: True})),
    "a tag in another category": ("tag", _moved_record("imgs/r3.png")),
    "two records of one path": ("tag", _full_record("imgs/r0.png")),  # r0 is in the first shard already
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_folder_is_one_line_and_leaves_no_index(ray_folders, tmp_path, case):
    """Each of these was a traceback (TypeError, KeyError, ValueError, ArrowInvalid, JSONDecodeError...) that left an
    index and its job file behind, or a wrong import (a cwd_b64 that is not base64 read as no folder at all)."""
    if case == "parquet over jsonl shards":
        pytest.importorskip("pyarrow")
    tag_out, feature_out, _, _ = ray_folders
    kind, change = DAMAGE[case]
    folder = tag_out if kind == "tag" else feature_out
    if isinstance(change, dict):
        _edit_manifest(folder, **change)
    elif change == "fifo":  # would block the read for ever
        (folder / "part-00001.errors.jsonl").unlink(missing_ok=True)
        os.mkfifo(folder / "part-00001.errors.jsonl")
    elif kind == "features":  # the error records beside a feature shard
        (folder / "part-00001.errors.jsonl").write_text(change)
    else:  # a tag shard's content
        (folder / "part-00001.jsonl").write_text(change)
    db = tmp_path / "x.db"
    result = CliRunner().invoke(cli, ["index", "--import", str(tag_out), "--import", str(feature_out), "--db", str(db)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert not db.exists() and not (tmp_path / ".x.db.i2v.json").exists() and not (tmp_path / "x.db-wal").exists()


def test_a_record_naming_a_file_with_a_nul_byte_is_a_failure(ray_folders, tmp_path):
    tag_out, feature_out, _, _ = ray_folders
    (tag_out / "part-00001.jsonl").write_text(json.dumps({"path": "imgs/r\u00000.png", "error": "x"}) + "\n")
    result = CliRunner().invoke(
        cli, ["index", "--import", str(tag_out), "--import", str(feature_out), "--db", str(tmp_path / "x.db")]
    )
    assert result.exit_code == 1 and "r\\0" + "0.png: no file name holds a NUL byte" in result.stderr, result.output


def test_a_damaged_shard_midway_keeps_an_existing_index_and_says_so(ray_folders, tmp_path):
    tag_out, feature_out, _, _ = ray_folders
    db = tmp_path / "kept.db"
    args = ["index", "--import", str(tag_out), "--import", str(feature_out), "--db", str(db)]
    assert CliRunner().invoke(cli, args).exit_code == 1  # r4.png is broken
    before = db.read_bytes()
    (tag_out / "part-00001.jsonl").write_text("not json\n")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "shard part-00001.jsonl (record 1) cannot be read" in result.stderr
    assert f"({db} keeps the rows imported before it)" in result.stderr
    assert db.exists() and len(db.read_bytes()) >= len(before) // 2


def test_a_failed_import_through_a_dangling_symlink_removes_what_it_made_not_the_link(ray_folders, tmp_path):
    tag_out, feature_out, _, _ = ray_folders
    (tag_out / "part-00001.jsonl").write_text("not json\n")
    link, target = tmp_path / "link.db", tmp_path / "target.db"
    link.symlink_to(target)
    result = CliRunner().invoke(
        cli, ["index", "--import", str(tag_out), "--import", str(feature_out), "--db", str(link)]
    )
    assert result.exit_code == 2, result.output
    assert link.is_symlink() and not target.exists() and not (tmp_path / ".target.db.i2v.json").exists()
