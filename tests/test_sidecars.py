"""``i2v export``: XMP sidecars read back by exiftool, Hydrus tag files, merging with existing sidecars."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.index import Index
from i2v_cli.sidecars import image_tags, merge_hydrus, merge_xmp
from i2v_cli.tags import Selection

EXIFTOOL = shutil.which("exiftool")


@pytest.fixture
def indexed(tmp_path, golden, tag_weights, feature_weights):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, name in enumerate(("img000.png", "img001.png", "img002.png")):
        shutil.copy(golden / "images" / "sq" / name, folder / f"p{i}.png")
    db = tmp_path / "c.db"
    result = CliRunner().invoke(cli, ["index", str(folder), "--db", str(db), "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder, db


def expected_tags(db, image, threshold):
    with Index(str(db), readonly=True) as idx:
        scores = idx.scores(idx.row_id(str(image)))
        return image_tags(scores, idx.tags, Selection.make(threshold))


def export(db, *args):
    return CliRunner().invoke(cli, ["export", "--db", str(db), *map(str, args)])


def exiftool_subjects(path):
    # -m: the synthetic models give about a thousand tags; exiftool reads only 1000 list items without it.
    out = subprocess.run([EXIFTOOL, "-m", "-j", "-XMP-dc:Subject", "-XMP-dc:Title", str(path)], capture_output=True,
                         check=True, text=True)  # fmt: skip
    record = json.loads(out.stdout)[0]
    subjects = record.get("Subject", [])
    return ([subjects] if isinstance(subjects, str) else [str(s) for s in subjects]), record.get("Title")


@pytest.mark.skipif(
    EXIFTOOL is None, reason="exiftool is not installed (Debian: apt-get install libimage-exiftool-perl)"
)
def test_xmp_sidecars_are_read_by_exiftool_and_merged(indexed):
    folder, db = indexed
    # An existing sidecar with a keyword and a title of its own: both survive the export.
    existing = folder / "p1.png.xmp"
    subprocess.run([EXIFTOOL, "-q", "-o", str(existing), "-XMP-dc:Subject=my own keyword", "-XMP-dc:Title=kept"],
                   check=True)  # fmt: skip
    result = export(db, "--to", "xmp", "-t", "0.2", "-f", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"written": 3, "unchanged": 0, "skipped": 0, "failed": 0}
    for i in range(3):
        image = folder / f"p{i}.png"
        want = expected_tags(db, image, 0.2)
        assert len(want) > 1 and want[-1].startswith("rating:")
        subjects, title = exiftool_subjects(f"{image}.xmp")
        if i == 1:
            assert subjects == ["my own keyword", *want] and title == "kept"
        else:
            assert subjects == want and title is None
    # Again: nothing to add, nothing rewritten. At a lower threshold: only the new tags are appended.
    assert json.loads(export(db, "--to", "xmp", "-t", "0.2", "-f", "json").stdout)["unchanged"] == 3
    export(db, "--to", "xmp", "-t", "0.1")
    subjects, _ = exiftool_subjects(folder / "p0.png.xmp")
    low = expected_tags(db, folder / "p0.png", 0.1)
    assert subjects[: len(expected_tags(db, folder / "p0.png", 0.2))] == expected_tags(db, folder / "p0.png", 0.2)
    assert sorted(subjects) == sorted(set(low) | set(expected_tags(db, folder / "p0.png", 0.2)))


def test_a_broken_sidecar_is_left_alone_and_reported(indexed):
    folder, db = indexed
    (folder / "p0.png.xmp").write_text("<x:xmpmeta unclosed")
    result = export(db, "--to", "xmp")
    assert result.exit_code == 1 and "p0.png.xmp: not XML" in result.stderr
    assert (folder / "p0.png.xmp").read_text() == "<x:xmpmeta unclosed"
    assert (folder / "p1.png.xmp").exists()


def test_hydrus_sidecars(indexed):
    folder, db = indexed
    (folder / "p2.png.txt").write_text("creator:someone\nseries:touhou\n")
    result = export(db, "--to", "hydrus", "-t", "0.15", "-f", "json")
    assert json.loads(result.stdout) == {"written": 3, "unchanged": 0, "skipped": 0, "failed": 0}
    for i in range(3):
        want = expected_tags(db, folder / f"p{i}.png", 0.15)
        lines = (folder / f"p{i}.png.txt").read_text().splitlines()
        if i == 2:
            assert lines[:2] == ["creator:someone", "series:touhou"]
            assert lines[2:] == [t for t in want if t != "series:touhou"]
        else:
            assert lines == want
    with Index(str(db), readonly=True) as idx:
        scores = idx.scores(idx.row_id(str(folder / "p0.png")))
        tags = idx.tags
    names = {t for t in want}
    assert any(t.startswith("rating:") for t in names)
    # Namespaces: a character tag scoring above the threshold is written as character:NAME, copyright as series:.
    fake = np.zeros(len(tags), np.float32)
    fake[[tags.index("long hair"), tags.index("hatsune miku"), tags.index("vocaloid"), 1537]] = 0.9
    assert image_tags(fake, tags, Selection.make(0.5)) == [
        "character:hatsune miku", "series:vocaloid", "long hair", "rating:questionable"]  # fmt: skip
    del scores


def test_merge_functions():
    assert merge_hydrus(None, ["a", "b"]) == "a\nb\n"
    assert merge_hydrus("b\n\nc\n", ["a", "b"]) == "b\nc\na\n"
    xmp = merge_xmp(None, ["x", "y"])
    assert xmp.count("<rdf:li>") == 2 and merge_xmp(xmp, ["y", "x"]) == xmp
    assert "<rdf:li>z</rdf:li>" in merge_xmp(xmp, ["z"])
