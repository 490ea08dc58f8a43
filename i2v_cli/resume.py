"""Resuming an interrupted run: which inputs an output file already holds, after repairing its cut-off tail."""

from __future__ import annotations

import csv
import io
import json
import os

from .errors import I2VError
from .writers import CSV_COLUMNS

RESUMABLE = ("jsonl", "csv")


def _read_complete_lines(path: str) -> str:
    """The file's text up to its last newline; a line cut off by a kill is removed from the file itself."""
    with open(path, "rb") as f:
        data = f.read()
    cut = data.rfind(b"\n") + 1
    if cut != len(data):
        with open(path, "r+b") as f:
            f.truncate(cut)
    return data[:cut].decode("utf-8", "surrogateescape")


def completed_paths(path: str, fmt: str) -> set[str]:
    """Paths that ``path`` (an earlier run's JSONL or CSV output) already has records for.

    A record cut off by a kill is removed so that the resumed run writes it whole: for JSONL a last line
    without its newline; for CSV the rows of the last image (its rows may be incomplete), rewritten in place.
    """
    if fmt not in RESUMABLE:
        raise I2VError(f"--resume needs --format jsonl or csv (a JSON list cannot be appended to), not {fmt}")
    if not os.path.exists(path):
        return set()
    text = _read_complete_lines(path)
    if fmt == "jsonl":
        done = set()
        for n, line in enumerate(text.splitlines(), 1):
            try:
                done.add(json.loads(line)["path"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise I2VError(f"cannot resume: line {n} of {path} is not an i2v JSONL record") from None
        return done
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows:
        return set()
    if tuple(rows[0]) != CSV_COLUMNS:
        raise I2VError(f"cannot resume: {path} is not an i2v CSV file (its header is not {','.join(CSV_COLUMNS)})")
    body = rows[1:]
    if body:
        last = body[-1][0]
        while body and body[-1][0] == last:
            body.pop()
        tmp = f"{path}.i2v-resume.tmp"
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows([rows[0], *body])
        os.replace(tmp, path)
    return {row[0] for row in body}
