"""Output writers: exact JSON/JSONL/CSV text, atomic JSON files, streaming."""

from __future__ import annotations

import csv
import json

import pytest

from i2v_cli.writers import open_writer, path_fields, record_path

RECORDS = [
    {
        "path": "a.png",
        "general": {"1girl": 0.75, "solo": 0.5},
        "character": {},
        "copyright": {},
        "rating": {"safe": 0.9, "questionable": 0.25, "explicit": 0.125},
    },
    {"path": 'b, "odd".png', "error": "truncated file"},
]


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_file_formats_round_trip(tmp_path, fmt):
    out = tmp_path / f"out.{fmt}"
    with open_writer(fmt, str(out)) as w:
        w.write(RECORDS[:1])
        w.write(RECORDS[1:])
    text = out.read_text()
    if fmt == "json":
        assert json.loads(text) == RECORDS
    elif fmt == "jsonl":
        assert [json.loads(line) for line in text.splitlines()] == RECORDS
    else:
        rows = list(csv.DictReader(text.splitlines()))
        assert [(r["path"], r["category"], r["tag"], r["score"], r["error"]) for r in rows] == [
            ("a.png", "general", "1girl", "0.75", ""),
            ("a.png", "general", "solo", "0.5", ""),
            ("a.png", "rating", "safe", "0.9", ""),
            ("a.png", "rating", "questionable", "0.25", ""),
            ("a.png", "rating", "explicit", "0.125", ""),
            ('b, "odd".png', "", "", "", "truncated file"),
        ]


def test_json_file_appears_only_when_complete(tmp_path):
    out = tmp_path / "out.json"
    w = open_writer("json", str(out))
    w.write(RECORDS)
    assert not out.exists()
    w.close()
    assert json.loads(out.read_text()) == RECORDS
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_aborted_json_leaves_nothing(tmp_path):
    out = tmp_path / "out.json"
    with pytest.raises(RuntimeError), open_writer("json", str(out)) as w:
        w.write(RECORDS)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_jsonl_is_flushed_batch_by_batch(tmp_path):
    out = tmp_path / "out.jsonl"
    w = open_writer("jsonl", str(out))
    w.write(RECORDS[:1])
    assert json.loads(out.read_text()) == RECORDS[0]
    w.close()


def test_empty_json_is_an_empty_list(tmp_path):
    out = tmp_path / "out.json"
    open_writer("json", str(out)).close()
    assert json.loads(out.read_text()) == []


def test_csv_append_writes_no_second_header(tmp_path):
    out = tmp_path / "out.csv"
    with open_writer("csv", str(out)) as w:
        w.write(RECORDS[1:])
    with open_writer("csv", str(out), keep=out.stat().st_size) as w:
        w.write(RECORDS[1:])
    assert out.read_text().count("path,category") == 1


def test_a_write_that_a_pipe_takes_in_part_is_completed_or_raises():
    # An unbuffered pipe (-o -, /dev/stdout) may take part of a large write: when its reader leaves midway (`| head
    # -c 10`), or a signal lands. The rest was dropped silently and the run ended with exit 0.
    import os
    import threading

    from i2v_cli.writers import Destination

    class Trickle:  # a file that takes at most 1,000 bytes a call, as a pipe may
        def __init__(self) -> None:
            self.got = bytearray()

        def write(self, data: bytes) -> int:
            self.got += bytes(data[:1000])
            return min(1000, len(data))

        def flush(self) -> None:
            pass

    trickle = Trickle()
    Destination(None, atomic=False, stream=trickle).write(b"x" * 250_000)  # type: ignore[arg-type]
    assert bytes(trickle.got) == b"x" * 250_000

    read, write = os.pipe()

    def leave_early() -> None:
        os.read(read, 10)
        os.close(read)

    reader = threading.Thread(target=leave_early)
    reader.start()
    with os.fdopen(write, "wb", buffering=0) as stream, pytest.raises(BrokenPipeError):
        Destination(None, atomic=False, stream=stream).write(b"y" * 1_000_000)
    reader.join()


@pytest.mark.parametrize("raw", ["!!!", "YQ", 5, ["YQ=="]])
def test_a_path_b64_that_is_not_base64_text_names_no_file(raw) -> None:
    """Decoded leniently, ``"!!!"`` named the empty path (the folder a run started in)."""
    with pytest.raises(ValueError, match="path_b64"):
        record_path({"path": "a.png", "path_b64": raw})


def test_record_path_inverts_path_fields() -> None:
    for name in ["a.png", "na\udcefve.png", "sp ace/\u00e9.png"]:
        assert record_path(path_fields("path", name)) == name
