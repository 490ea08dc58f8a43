"""``i2v export``: XMP sidecars read back by exiftool, Hydrus tag files, merging with existing sidecars."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time

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
    assert merge_hydrus("b\r\nc\r\n", ["a"]) == "b\r\nc\r\na\r\n"  # a Windows file keeps its line ends
    xmp = merge_xmp(None, ["x", "y"])
    assert xmp.count("<rdf:li>") == 2 and merge_xmp(xmp, ["y", "x"]) == xmp
    assert "<rdf:li>z</rdf:li>" in merge_xmp(xmp, ["z"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["a FIFO", "a link to /dev/zero"])
def test_a_sidecar_that_is_not_a_regular_file_is_reported_not_read(indexed, what):
    """A FIFO hung the export for ever; a link to /dev/zero was read until memory ran out."""
    folder, db = indexed
    target = folder / "p0.png.txt"
    if what == "a FIFO":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    result = export(db, "--to", "hydrus", "-f", "json")
    assert result.exit_code == 1, result.output
    assert "p0.png.txt: the existing sidecar is not a regular file; left as it is" in result.stderr
    assert json.loads(result.stdout)["written"] == 2


SEQ_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><!-- mine --><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    '<rdf:Description rdf:about="" xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:subject><rdf:Seq>'
    "<rdf:li>mytag</rdf:li></rdf:Seq></dc:subject></rdf:Description></rdf:RDF></x:xmpmeta>"
)


def test_an_existing_seq_of_keywords_is_extended_not_hidden():
    """A Bag added beside the Seq made exiftool show only the new keywords: the user's were hidden."""
    merged = merge_xmp(SEQ_XMP, ["a", "b"])
    assert merged.count("<rdf:Seq>") == 1 and "<rdf:Bag>" not in merged
    assert merged.index("mytag") < merged.index(">a<") < merged.index(">b<")
    if EXIFTOOL is not None:
        out = subprocess.run([EXIFTOOL, "-j", "-XMP-dc:Subject", "-"], input=merged, capture_output=True, text=True)
        assert json.loads(out.stdout)[0]["Subject"] == ["mytag", "a", "b"]


def test_a_sidecar_holding_every_keyword_is_left_byte_for_byte():
    """It was rewritten all the same: its comments dropped, its prefixes renamed (ns0:...)."""
    assert merge_xmp(SEQ_XMP, ["mytag"]) == SEQ_XMP


def test_a_full_disk_stops_the_export_with_exit_3(indexed, full_folder):
    """The disk refusing the write inside write_bytes was a raw OSError traceback, then a failure per sidecar (exit 1,
    every other one failing the same way); it stops the export at once, exit 3, as for `i2v tag`."""
    folder, db = indexed
    small = full_folder
    os.unlink(small / "fill")  # room for the image, then none for its sidecar
    shutil.copy(folder / "p0.png", small / "p0.png")
    with open(small / "fill", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    with Index(str(db)) as idx, idx.transaction():
        moved = (os.fsencode(small / "p0.png"), str(small / "p0.png"), str(folder / "p0.png"))
        idx.conn.execute("UPDATE images SET path = ?, path_text = ? WHERE path_text = ?", moved)
    result = export(db, "--to", "xmp", "-t", "0.0")
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and result.stderr.count("No space left on device") == 1
    assert sorted(p.name for p in small.iterdir()) == ["fill", "p0.png"]  # no temporary file left


def test_a_sidecar_written_by_another_run_meanwhile_is_merged_again(indexed, monkeypatch):
    """Two exports at once: each read, merged and renamed its own version, and the last rename dropped the other
    run's keywords (1 to 4 sidecars of 1,000 in every try of the hostile review)."""
    from i2v_cli import sidecars

    folder, db = indexed
    target = folder / "p0.png.txt"
    target.write_text("mine\n")
    real_read = sidecars._read
    calls = []

    def read_then_overtaken(path):
        text = real_read(path)
        if path == str(target) and not calls:  # another writer lands between this read and the rename
            calls.append(path)
            time.sleep(0.01)  # a later modification time, whatever the file system's clock granularity
            target.write_text("mine\nfrom the other run\n")
        return text

    monkeypatch.setattr(sidecars, "_read", read_then_overtaken)
    with Index(str(db), readonly=True) as idx:
        summary = sidecars.export(idx, "hydrus", Selection.make(0.5))
    assert summary.failures == [] and summary.written == 3
    lines = target.read_text().splitlines()
    assert lines[:2] == ["mine", "from the other run"] and lines[2:] == expected_tags(db, folder / "p0.png", 0.5)


def test_a_hydrus_line_is_cut_at_newlines_only():
    """str.splitlines also cut at \\u2028, \\x0b and \\x1c: one tag of the user's became two."""
    assert merge_hydrus("a\u2028b\nc\x1cd\r\n", ["e"]) == "a\u2028b\nc\x1cd\ne\n"


def test_a_merged_sidecar_keeps_its_comments_and_prefixes():
    """Merging dropped the packet's comments and renamed its other namespaces' prefixes (xmp:Rating -> ns2:Rating);
    the values stayed readable, the file was no longer the user's."""
    xmp = SEQ_XMP.replace(
        'xmlns:dc="http://purl.org/dc/elements/1.1/"',
        'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="3"',
    )
    merged = merge_xmp(xmp, ["a"])
    assert "<!-- mine -->" in merged and 'xmp:Rating="3"' in merged and "ns0:" not in merged and "ns1:" not in merged
    assert merged.index("mytag") < merged.index(">a<")
    import xml.etree.ElementTree as ET

    assert "xmp" not in ET._namespace_map.values()  # the packet's prefix was not left in ElementTree's registry
    if EXIFTOOL is not None:
        out = subprocess.run([EXIFTOOL, "-j", "-XMP:all", "-"], input=merged, capture_output=True, text=True)
        got = json.loads(out.stdout)[0]
        assert got["Subject"] == ["mytag", "a"] and got["Rating"] == 3
