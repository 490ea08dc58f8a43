"""Sinks: where records go. JSON (one list), JSONL (one object a line), CSV (one row a tag), and the one way
every command opens an output.

What holds for every sink (each point has a test in tests/test_outputs.py):

- **Valid UTF-8 whatever the file names.** A path that is not valid UTF-8 is written as a readable ``path``
  (undecodable bytes as ``\\xNN``) plus ``path_b64``, its exact bytes in base64 (as ripgrep's JSON output
  does); :func:`record_path` gives the exact name back. Other text (error messages) is cleaned the same way.
  Scores are written as the shortest decimal that reads back as the same float32. No NaN or Infinity.
- **Written where the user pointed.** ``None`` or ``-`` is stdout; ``/dev/stdout``, ``/dev/fd/N`` and
  other non-regular files (FIFOs, ``/dev/null``) are written in place, never renamed over; a symlink is
  followed (the link stays). A JSON file is written beside its target and renamed into place when whole;
  JSONL and CSV stream into the file, flushed batch by batch, so a killed run keeps what it finished.
- **One writer per output.** A regular-file output is locked for the run (``flock`` on a small hidden job
  file beside it, :mod:`i2v_cli.resume`); a second run on the same output is refused in one line.

Nothing here prints.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import json
import os
import select
import stat
import sys
from collections.abc import Collection, Iterable, Mapping
from typing import IO, Any, TypeVar

import numpy as np

from .atomic import AtomicFile, describe_oserror, is_special, std_fd
from .errors import I2VError, OutputError, WriteError
from .sniff import describe, is_text, read_head, sniff

FORMATS = ("json", "jsonl", "csv")
#: Columns of the CSV format: one row per (image, tag); an image that failed has one row with its error.
#: ``path_b64`` holds the exact bytes of a name that is not valid UTF-8 (empty otherwise).
CSV_COLUMNS = ("path", "category", "tag", "score", "error", "path_b64")
#: Keys whose values are file names, written with their exact bytes when these are not UTF-8.
PATH_KEYS = ("path", "query")

Record = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# Text that is always valid UTF-8


def display(text: str) -> str:
    """``text`` as valid UTF-8 for people and parsers: bytes that a name held but UTF-8 cannot (surrogate
    escapes) become ``\\xNN``."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name can hold
        return text.encode("utf-8", "backslashreplace").decode("ascii")


def one_line(text: str) -> str:
    """``text`` for a one-line message: valid UTF-8, newlines and other control characters escaped."""
    shown = display(text)
    if any(c < " " for c in shown):
        shown = "".join(c if c >= " " else repr(c)[1:-1] for c in shown)
    return shown


def path_fields(key: str, path: str) -> dict[str, str]:
    """``{key: path}``, or for a name that is not valid UTF-8 ``{key: shown, key_b64: exact bytes}``."""
    try:
        path.encode("utf-8")
        return {key: path}
    except UnicodeEncodeError:
        raw = os.fsencode(path)
        return {key: display(path), f"{key}_b64": base64.b64encode(raw).decode("ascii")}


def record_path(record: Mapping[str, Any], key: str = "path") -> str:
    """The exact file name a written record names (inverse of :func:`path_fields`). Raises ValueError for a
    record that names none: no text, or bytes that are not base64 (decoded leniently, ``"!!!"`` named ``""``)."""
    raw = record.get(f"{key}_b64")
    if raw:
        if not isinstance(raw, str):
            raise ValueError(f"{key}_b64 is not a string")
        try:
            return os.fsdecode(base64.b64decode(raw, validate=True))
        except binascii.Error as exc:
            raise ValueError(f"{key}_b64 is not base64 ({exc})") from None
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{key} is not a string")
    return value


def short_float(x: float) -> float:
    """A float32 score as the float whose repr is the shortest decimal reading back as that float32."""
    return float(str(np.float32(x)))


def encode_record(record: Mapping[str, Any]) -> Record:
    """A record as it is written: names with their exact bytes, text valid UTF-8, scores in short form."""
    out: Record = {}
    for key, value in record.items():
        if key in PATH_KEYS and isinstance(value, str):
            out.update(path_fields(key, value))
        else:
            out[key] = _encode_value(value)
    return out


def _encode_value(value: Any) -> Any:
    if isinstance(value, str):
        return display(value)
    if isinstance(value, float | np.floating):
        if not np.isfinite(value):
            raise ValueError("a record holds a non-finite number")
        return short_float(value)
    if isinstance(value, dict):
        if value and all(isinstance(v, float) for v in value.values()):  # a category's scores, many at once
            scores = np.fromiter(value.values(), np.float32, len(value))
            if not np.isfinite(scores).all():
                raise ValueError("a record holds a non-finite score")
            return dict(zip(map(display, value), map(float, scores.astype(str)), strict=True))
        return encode_record(value)
    if isinstance(value, list | tuple):
        return [_encode_value(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    return value


def dumps(record: Mapping[str, Any]) -> str:
    """One record as a line of JSON (RFC 8259: UTF-8, no NaN)."""
    return json.dumps(encode_record(record), ensure_ascii=False, allow_nan=False)


# --------------------------------------------------------------------------------------------------------------
# Destinations


def is_stdout(path: str | None) -> bool:
    """Whether ``-o`` names standard output (``None`` or ``-``)."""
    return path is None or path == "-"


def _write_all(raw: IO[bytes], data: bytes) -> None:
    """All of ``data`` to ``raw``. An unbuffered file (stdout, a pipe, a device) may take only part of a write: when
    its reader leaves midway, or a signal lands during a large write to a pipe. The rest was dropped, silently; now
    the next write raises (BrokenPipeError) or completes it."""
    view = memoryview(data)
    while view:
        written = raw.write(view)
        if written is None:  # a non-blocking descriptor that is full: wait until it takes more
            select.select([], [raw.fileno()], [])
            continue
        view = view[written:]


def writes_in_place(path: str | None) -> bool:
    """Whether an output is a stream written in place (stdout, a device, a FIFO) rather than a regular file
    that can be locked, resumed and renamed into."""
    return is_stdout(path) or std_fd(str(path)) is not None or is_special(str(path))


class Destination:
    """Bytes going to one output: stdout, a descriptor or special file (written in place), or a regular
    file, either streamed into (``atomic=False``, truncated or, resuming, appended at ``keep`` bytes) or
    written beside it and renamed into place on :meth:`finish` (``atomic=True``)."""

    def __init__(
        self, path: str | None, *, atomic: bool, keep: int | None = None, stream: IO[bytes] | None = None
    ) -> None:
        self.path = None if is_stdout(path) else path
        self._atomic: AtomicFile | None = None
        self._whole = keep or 0  # bytes of a streamed file that end at a whole batch
        try:
            self._borrowed = self.path is None or stream is not None
            if stream is not None:
                self.raw = stream
            elif self.path is None:
                sys.stdout.flush()
                self.raw: IO[bytes] = sys.stdout.buffer
            elif (fd := std_fd(self.path)) is not None:
                self.raw = os.fdopen(os.dup(fd), "wb", buffering=0)
            elif is_special(self.path):
                self.raw = open(self.path, "wb", buffering=0)  # noqa: SIM115 (closed in finish/abort)
            elif atomic:
                self._atomic = AtomicFile(self.path)
                self.raw = self._atomic.stream
            else:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
                self.raw = os.fdopen(fd, "wb")
                self.raw.truncate(keep or 0)
                self.raw.seek(keep or 0)
        except OSError as exc:
            raise OutputError(describe_oserror(self.path or "stdout", exc)) from None

    @property
    def streamed(self) -> bool:
        """Whether what is written is there at once (not an atomic file that appears only when finished)."""
        return self._atomic is None

    def write(self, data: bytes) -> None:
        """Write and flush (a batch at a time): what is written is there should the run be killed. A write that
        fails midway (a full disk) is taken back from a regular file, so it ends at a whole batch."""
        try:
            _write_all(self.raw, data)
            self.raw.flush()
            self._whole += len(data)
        except BrokenPipeError:
            raise
        except OSError as exc:
            if self._atomic is None and self.path is not None and not writes_in_place(self.path):
                with contextlib.suppress(OSError, ValueError):
                    os.ftruncate(self.raw.fileno(), self._whole)
            raise WriteError(describe_oserror(self.path or "stdout", exc)) from None

    def finish(self) -> None:
        """Everything is written: close, and put an atomic file in place."""
        if self._atomic is not None:
            self._atomic.commit()
            return
        try:
            self.raw.flush()
            if self.path is not None and not writes_in_place(self.path):
                os.fsync(self.raw.fileno())
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise WriteError(describe_oserror(self.path or "stdout", exc)) from None
        finally:
            self._close()

    def abort(self) -> None:
        """Stop: a streamed file keeps what it has; an atomic file is not put in place."""
        if self._atomic is not None:
            self._atomic.discard()
            return
        self._close()

    def _close(self) -> None:
        if self._borrowed:  # sys.stdout stays open for the caller
            return
        with contextlib.suppress(OSError):
            self.raw.close()


# --------------------------------------------------------------------------------------------------------------
# Sinks

_S = TypeVar("_S", bound="Sink")


class Sink:
    """An output that ends with ``close`` (put what was written in place) or ``abort`` (give up). As a context
    manager it closes on success and on an interruption (Ctrl-C, SIGTERM, SIGHUP: the work done so far is
    kept), and aborts on any other error."""

    def write(self, records: Iterable[Record]) -> None:
        """Write a batch of records."""
        raise NotImplementedError

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
    """Records as text to a :class:`Destination`, flushed batch by batch."""

    #: Whether a file is written beside its target and renamed into place when whole.
    atomic = False

    def __init__(self, path: str | None = None, *, keep: int | None = None, stream: IO[bytes] | None = None) -> None:
        self.path = None if is_stdout(path) else path
        self.dest = Destination(path, atomic=self.atomic, keep=keep, stream=stream)
        self.count = 0
        self._closed = False
        self._begin(keep)

    def _begin(self, keep: int | None) -> None:
        """Whatever opens the format (a CSV header)."""

    def write(self, records: Iterable[Record]) -> None:
        buf = io.StringIO()
        for record in records:
            self._format(record, buf)
            self.count += 1
        self.dest.write(buf.getvalue().encode("utf-8"))

    def _format(self, record: Record, buf: io.StringIO) -> None:
        raise NotImplementedError

    def _end(self) -> str:
        """Whatever closes the format (JSON's closing bracket)."""
        return ""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            end = self._end()
            if end:
                self.dest.write(end.encode("utf-8"))
        except BaseException:
            self.dest.abort()
            raise
        self.dest.finish()

    def abort(self) -> None:
        """Stop writing: a streamed format keeps what it has (JSON on stdout is closed to stay valid); an
        atomic JSON file is not put in place."""
        if self._closed:
            return
        self._closed = True
        end = self._end()
        if end and self.dest.streamed:
            with contextlib.suppress(OSError):
                self.dest.write(end.encode("utf-8"))
        self.dest.abort()


class JsonlWriter(Writer):
    """One JSON object a line."""

    def _format(self, record: Record, buf: io.StringIO) -> None:
        buf.write(dumps(record))
        buf.write("\n")


class JsonWriter(Writer):
    """A single JSON list; to a file it is atomic (temp file + rename), to stdout or a device it streams."""

    atomic = True

    def _format(self, record: Record, buf: io.StringIO) -> None:
        buf.write("[\n  " if self.count == 0 else ",\n  ")
        buf.write(dumps(record))

    def _end(self) -> str:
        return "[]\n" if self.count == 0 else "\n]\n"


class CsvWriter(Writer):
    """Long format: ``path,category,tag,score,error,path_b64``, one row per selected tag; a failed image gets
    one row with its path and error."""

    def _begin(self, keep: int | None) -> None:
        if not keep:
            self.dest.write(_csv_line(CSV_COLUMNS).encode("utf-8"))

    def _format(self, record: Record, buf: io.StringIO) -> None:
        rec = encode_record(record)
        path, b64 = rec["path"], rec.get("path_b64", "")
        out = csv.writer(buf, lineterminator="\n")
        if "error" in rec:
            out.writerow([path, "", "", "", rec["error"], b64])
            return
        for category, tags in rec.items():
            if category in ("path", "path_b64"):
                continue
            for tag, score in tags.items():
                out.writerow([path, category, tag, repr(score), "", b64])


def _csv_line(values: Iterable[str]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(list(values))
    return buf.getvalue()


WRITERS: dict[str, type[Writer]] = {"json": JsonWriter, "jsonl": JsonlWriter, "csv": CsvWriter}


def open_writer(fmt: str, path: str | None = None, *, keep: int | None = None) -> Writer:
    """A writer for ``fmt`` (json, jsonl or csv) to ``path`` (stdout when None or ``-``); ``keep`` (JSONL,
    CSV) appends after the first ``keep`` bytes of an existing file instead of starting it anew."""
    cls = WRITERS.get(fmt)
    if cls is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return cls(path, keep=keep)


def render(fmt: str, records: Iterable[Record]) -> bytes:
    """Records in ``fmt`` as bytes (a whole small file, such as a Ray shard, to write atomically)."""
    buf = io.BytesIO()
    writer = WRITERS[fmt](stream=buf)
    writer.write(records)
    writer.close()
    return buf.getvalue()


class Tee(Sink):
    """Several sinks fed the same records (records to a file and caption files, say)."""

    def __init__(self, *sinks: Sink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]
        self._refused: Sink | None = None  # the sink whose disk refused a write

    def write(self, records: Iterable[Record]) -> None:
        batch = list(records)
        for sink in self.sinks:
            try:
                sink.write(batch)
            except WriteError:
                self._refused = sink
                raise

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def abort(self) -> None:
        """Give up. When one sink's disk refused a write (captions on a full disk), the others keep what they were
        given, as on an interruption: a JSON file on another disk gets the records written so far. A second failure
        while keeping them is not reported over the first, which is what stops the run."""
        for sink in self.sinks:
            if self._refused is None or sink is self._refused:
                sink.abort()
                continue
            try:
                sink.close()
            except (I2VError, OSError):
                sink.abort()


#: Output formats an ``-o`` file's extension stands for.
EXTENSION_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".npy": "npy",
                     ".parquet": "parquet"}  # fmt: skip


def format_for(fmt: str | None, output: str | None, allowed: Iterable[str], default: str) -> str:
    """The output format: ``fmt`` when given, else the one ``-o``'s extension stands for, else ``default``.
    Refuses a format that contradicts the extension (CSV into ``x.json``) or that this command cannot write
    there, in one line."""
    allowed = tuple(allowed)
    ext = os.path.splitext(output or "")[1].lower() if not writes_in_place(output) else ""
    implied = EXTENSION_FORMATS.get(ext)
    if fmt is not None:
        if implied is not None and implied != fmt:
            raise OutputError(
                f"-o {display(str(output))} has the extension of {implied}, but --format {fmt} was asked for: "
                f"change one of them"
            )
        return fmt
    if implied is None:
        return default
    if implied not in allowed:
        raise OutputError(
            f"-o {display(str(output))}: this command writes {', '.join(allowed)}, not {implied}; "
            f"name the file with one of those extensions"
        )
    return implied


def _same_as_fd(st: os.stat_result, fd: int) -> bool:
    """Whether ``st`` is the file open as ``fd`` (False when ``fd`` is closed)."""
    try:
        return os.path.samestat(st, os.fstat(fd))
    except OSError:
        return False


def check_output(
    output: str | None,
    inputs: Iterable[str] = (),
    writes: Collection[str] | None = ("text",),
    *,
    pair: bool = False,
) -> None:
    """Refuse, before anything is opened, an output that would destroy what the run reads or a file that is not
    i2v's to replace: a folder, one of the inputs (the same file by device and inode: a symlink or hard link to an
    input counts), the paths file of a feature pair (``vecs.paths.jsonl``: its vectors would lose their paths)
    unless ``pair`` says the pair itself is being written, standard error (``/dev/stderr``, ``2> x`` with ``-o x``:
    the messages would spoil the output; standard output is what ``-o -`` is for), or an existing file whose
    content is not of a kind the command writes (``writes``: ``text``, ``npy``, ``safetensors``, ``zip`` for
    ``.npz``; empty files always pass; None: not looked at) unless i2v's job file is beside it.
    An allowlist, not a list of foreign kinds: ``-o other.ico`` or ``-o library.db`` by mistake is refused
    whatever the format, and a text output whose first bytes look like a magic number still counts as text."""
    if is_stdout(output):
        return
    assert output is not None
    try:
        out: os.stat_result | None = os.stat(output)
    except OSError:
        out = None
    # A file or pipe that the messages go to as well (a terminal shows both; /dev/null keeps neither)
    mixes = out is not None and (stat.S_ISREG(out.st_mode) or stat.S_ISFIFO(out.st_mode) or stat.S_ISSOCK(out.st_mode))
    if mixes and _same_as_fd(out, 2) and not _same_as_fd(out, 1):
        raise OutputError(
            f"-o {display(output)} is where i2v writes its messages (standard error): they would mix with the "
            "output and spoil it; name a file, or write to standard output (-o -)"
        )
    if writes_in_place(output):
        return
    if out is not None and stat.S_ISDIR(out.st_mode):
        raise OutputError(f"-o {display(output)} is a folder: name a file")
    if out is None:
        return
    for path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.path.samestat(out, st):
            raise OutputError(
                f"-o {display(output)} is one of the inputs ({display(path)}): it would be destroyed; "
                "choose another output"
            )
    head = read_head(output)
    if not pair and head is not None and head.startswith(b'{"format": "i2v-features"'):
        raise OutputError(
            f"-o {display(output)} is the paths file of a feature pair (i2v features -o FILE.npy): writing it "
            "would part the vectors from their paths; choose another output"
        )
    if writes is None:  # a first check, before all the inputs are known: the content is looked at later
        return
    if head is None or not head or ("text" in writes and is_text(head)) or sniff(head) in writes:
        return
    from .resume import job_file_for  # resume builds on this module

    if os.path.isfile(job_file_for(output)):  # an earlier run's output (a CSV of control-character names, say)
        return
    kind = sniff(head)
    what = "text" if is_text(head) else describe(kind) if kind != "unknown" else "data of a kind i2v does not write"
    raise OutputError(
        f"-o {display(output)} holds something else ({what}), not an output of this command: it is left as it "
        "is; choose another output, or remove it first"
    )
