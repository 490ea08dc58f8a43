"""Output sinks for per-image records: JSON (one list), JSONL (one object a line) and CSV (one row a tag).

Records are written in input order and flushed batch by batch, so a pipeline sees results as they come and a
killed run keeps what it finished. A JSON file is written beside its target and renamed into place on close,
so it is never half-written. Paths that are not valid UTF-8 are written back as their original bytes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from typing import IO, Any, TypeVar

FORMATS = ("json", "jsonl", "csv")
#: Columns of the CSV format: one row per (image, tag); an image that failed has one row with its error.
CSV_COLUMNS = ("path", "category", "tag", "score", "error")

Record = dict[str, Any]


def _stdout() -> IO[str]:
    return io.TextIOWrapper(
        sys.stdout.buffer,
        encoding="utf-8",
        errors="surrogateescape",
        newline="",
        line_buffering=False,
        write_through=True,
    )


def _dumps(record: Record) -> str:
    return json.dumps(record, ensure_ascii=False)


_S = TypeVar("_S", bound="Sink")


class Sink:
    """An output that ends with ``close`` (put what was written in place) or ``abort`` (give up). As a context
    manager it closes on success and on Ctrl-C, which keeps the work done so far, and aborts on any other error."""

    def close(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None or issubclass(exc_type, KeyboardInterrupt):
            self.close()
        else:
            self.abort()


class Writer(Sink):
    """Base writer of records: ``write`` a batch of records, ``close`` when done (``abort`` to give up without a partial
    JSON file). Usable as a context manager, which closes on Ctrl-C and aborts on any other exception."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        self.path = path
        self._tmp: str | None = None
        if path is None:
            self.stream: IO[str] = _stdout()
        elif self.atomic:
            folder = os.path.dirname(os.path.abspath(path))
            fd, self._tmp = tempfile.mkstemp(prefix=".i2v-", suffix=".tmp", dir=folder)
            self.stream = open(fd, "w", encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115
        else:
            mode = "a" if append else "w"
            self.stream = open(path, mode, encoding="utf-8", errors="surrogateescape", newline="")  # noqa: SIM115
        self.count = 0

    atomic = False

    def write(self, records: Iterable[Record]) -> None:
        for record in records:
            self._write_one(record)
            self.count += 1
        self.stream.flush()

    def _write_one(self, record: Record) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Whatever closes the format (JSON's closing bracket)."""

    def close(self) -> None:
        self._finish()
        self.stream.flush()
        if self.path is None:
            self.stream.detach()  # leave sys.stdout open for the caller
            return
        self.stream.close()
        if self._tmp is not None:
            os.replace(self._tmp, self.path)
            self._tmp = None

    def abort(self) -> None:
        """Stop writing: a streamed format keeps what it has; an atomic JSON file is not put in place."""
        if self.path is None:
            self._finish()
            self.stream.flush()
            self.stream.detach()
            return
        self.stream.close()
        if self._tmp is not None:
            os.unlink(self._tmp)
            self._tmp = None


class JsonlWriter(Writer):
    """One JSON object a line."""

    def _write_one(self, record: Record) -> None:
        self.stream.write(_dumps(record) + "\n")


class JsonWriter(Writer):
    """A single JSON list; to a file it is atomic (temp file + rename), to stdout it streams."""

    atomic = True

    def _write_one(self, record: Record) -> None:
        self.stream.write(("[\n  " if self.count == 0 else ",\n  ") + _dumps(record))

    def _finish(self) -> None:
        self.stream.write("[]\n" if self.count == 0 else "\n]\n")


class CsvWriter(Writer):
    """Long format: ``path,category,tag,score,error``, one row per selected tag; a failed image gets one row
    with only its path and error."""

    def __init__(self, path: str | None, append: bool = False) -> None:
        super().__init__(path, append)
        self._csv = csv.writer(self.stream, lineterminator="\n")
        if not (append and self.stream.tell() > 0):
            self._csv.writerow(CSV_COLUMNS)

    def _write_one(self, record: Record) -> None:
        if "error" in record:
            self._csv.writerow([record["path"], "", "", "", record["error"]])
            return
        for category, tags in record.items():
            if category == "path":
                continue
            for tag, score in tags.items():
                self._csv.writerow([record["path"], category, tag, repr(score), ""])


def open_writer(fmt: str, path: str | None = None, append: bool = False) -> Writer:
    """A writer for ``fmt`` (json, jsonl or csv) to ``path``, or to stdout when ``path`` is None."""
    cls = {"json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter}.get(fmt)
    if cls is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return cls(path, append)
