"""The job file beside an output: one writer at a time, and ``--resume`` only of the same job.

Every regular-file output ``tags.jsonl`` gets a small hidden file beside it, ``.tags.jsonl.i2v.json``,
holding what shaped the records (command, format, thresholds, top-k, tag list, model SHA-256, precision)
and the run's status. While a run writes the output it holds an exclusive ``flock`` on that file, so a
second run on the same output is refused at once instead of interleaving lines. ``--resume`` reads it
before touching a byte of the output: a file without one (not i2v output, or another program's) or one
written with other options is refused in one line naming the difference. Then the output is read a line
at a time (memory bounded by the number of paths, not the file's size) for the paths it holds, and the
record cut off by a kill is left out so that the resumed run writes it whole.

The job file is written in place (never renamed) because the lock lives on its inode, each status in one write
over the last. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import DISK_ERRNOS, describe_oserror, resolve_target
from .errors import OutputError, WriteError
from .store import how_weights_differ, same_weights
from .writers import CSV_COLUMNS, display, record_path, writes_in_place

JOB_FORMAT = "i2v-job"
JOB_VERSION = 1
RESUMABLE = ("jsonl", "csv", "npy")
_CATEGORIES = ("general", "character", "copyright", "rating")


def job_file_for(output: str | os.PathLike[str]) -> Path:
    """The hidden job file of an output: ``dir/tags.jsonl`` -> ``dir/.tags.jsonl.i2v.json`` (beside the file
    a symlink leads to)."""
    target = resolve_target(output)
    return target.with_name(f".{target.name}.i2v.json")


def _write_error(output: str, exc: OSError) -> OutputError:
    """The job file could not be written: a full disk is a WriteError (exit 3) as for the output itself, anything
    else (no such folder, no permission) an output that cannot be used."""
    return (WriteError if exc.errno in DISK_ERRNOS else OutputError)(describe_oserror(output, exc))


@dataclass
class JobLock:
    """The exclusive lock of one output for one run, and its job record."""

    output: str
    job: dict[str, Any]
    path: Path = field(init=False)
    previous: dict[str, Any] | None = field(init=False, default=None)
    _fd: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.path = job_file_for(self.output)
        shown = display(self.output)
        while True:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as exc:  # the output's folder is missing or not writable: name the output
                raise _write_error(self.output, exc) from None
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                self._fd = None
                raise OutputError(
                    f"another i2v run is writing {shown} right now: wait for it to end, or choose another output"
                ) from None
            if self._still_at_path():
                break
            os.close(self._fd)  # a run that never started removed it meanwhile (see release): lock the new one
        self.previous = self._read()

    def _still_at_path(self) -> bool:
        """Whether the file locked is still the one at :attr:`path` (not removed by :meth:`release` meanwhile)."""
        assert self._fd is not None
        try:
            return os.path.samestat(os.fstat(self._fd), os.stat(self.path))
        except OSError:
            return False

    def _read(self) -> dict[str, Any] | None:
        assert self._fd is not None
        try:
            data = os.pread(self._fd, 1 << 20, 0)
            job = json.loads(data) if data else None
        except (OSError, ValueError):
            return None
        return job if isinstance(job, dict) and job.get("format") == JOB_FORMAT else None

    def record(self, status: str) -> None:
        """Write the job with ``status`` (running, interrupted, complete) into the job file, in place."""
        if self._fd is None:
            return
        data = (json.dumps({**self.job, "status": status}, ensure_ascii=False, indent=1) + "\n").encode()
        try:
            # One write over the old record, padded with spaces to its length (JSON ignores them), not a truncation
            # then a write: a run killed between the two, or a disk that filled after the truncation, left the file
            # empty, and --resume then refused the output as not i2v's.
            os.pwrite(self._fd, data.ljust(os.fstat(self._fd).st_size), 0)
            os.fsync(self._fd)
        except OSError as exc:  # named by its output: the job file is i2v's business, the output the user's
            raise _write_error(self.output, exc) from None

    def release(self) -> None:
        """Let the next run in (closing the file drops the lock). A job file still empty (the run was refused before
        it began: a --db that is not an index, a --resume of another job) is removed first, not left beside the
        user's files; a run waiting to lock it sees that and locks a new one."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                if os.fstat(self._fd).st_size == 0 and self._still_at_path():
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


#: Options a job records only when they differ from these (``--decode cuda``): older job files lack them.
OPTION_DEFAULTS: dict[str, Any] = {"decode": "cpu"}


def make_job(command: str, fmt: str, options: Mapping[str, Any], model: Mapping[str, Any]) -> dict[str, Any]:
    """The record of what shapes an output's records; two runs may share an output only when these match."""
    return {
        "format": JOB_FORMAT,
        "version": JOB_VERSION,
        "command": command,
        "output_format": fmt,
        "options": dict(options),
        "model": dict(model),
    }


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    diffs = []
    for key in ("command", "output_format"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key.replace('_', ' ')} {old.get(key)} (now {new.get(key)})")
    # An option recorded only when not at its default (so that older job files stay resumable) is the default
    # where it is absent.
    old_opts = {**OPTION_DEFAULTS, **(old.get("options") or {})}
    new_opts = {**OPTION_DEFAULTS, **(new.get("options") or {})}
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            diffs.append(f"{key.replace('_', ' ')} {_show(old_opts.get(key))} (now {_show(new_opts.get(key))})")
    old_model, new_model = old.get("model") or {}, new.get("model") or {}
    if not same_weights(old_model, new_model):
        how = how_weights_differ(old_model, new_model)
        diffs.append(f"model {old_model.get('source')} (now {new_model.get('source')}, {how})")
    return diffs


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True) if isinstance(value, dict | list) else str(value)


def check_resumable(lock: JobLock, output_exists: bool) -> None:
    """Refuse to resume an output that is not this job's: no job file (not i2v output, or another program's),
    or a job with other options, model or format."""
    if not output_exists:
        return
    shown = display(lock.output)
    if lock.previous is None:
        raise OutputError(
            f"cannot resume: {shown} has no record of an i2v run that wrote it ({lock.path.name} beside it); "
            "it is not i2v output of this version. Leave out --resume to replace it, or choose another output"
        )
    diffs = _differences(lock.previous, lock.job)
    if diffs:
        raise OutputError(
            f"cannot resume {shown}: it was written with {'; '.join(diffs)}. "
            "Rerun with the same options, or leave out --resume to start over"
        )


@dataclass
class Progress:
    """What an earlier run's output holds: the exact paths done, and how many bytes of it to keep (the record
    cut off by a kill, or the last image's CSV rows, are left out to be written again)."""

    done: set[str]
    keep: int


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    """The complete lines of a file (split on ``\\n`` only), with the offset each starts at."""
    offset = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                return  # cut off by a kill
            yield offset, line
            offset += len(line)


def read_progress(output: str, fmt: str) -> Progress:
    """Read an earlier run's JSONL or CSV output (already known to be this job's) without changing it."""
    shown = display(output)
    if os.path.isdir(output):
        raise OutputError(f"cannot resume: {shown} is a folder; -o names the output file")
    try:
        if fmt == "jsonl":
            return _jsonl_progress(output, shown)
        if fmt == "csv":
            return _csv_progress(output, shown)
    except OSError as exc:
        raise OutputError(f"cannot resume: cannot read {shown}: {exc.strerror or exc}") from None
    raise OutputError(f"--resume needs --format jsonl or csv (a JSON list cannot be appended to), not {fmt}")


def _jsonl_progress(output: str, shown: str) -> Progress:
    done: set[str] = set()
    keep = 0
    for n, (offset, line) in enumerate(_lines(output), 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not ("error" in record or all(c in record for c in _CATEGORIES)):
                raise ValueError
            done.add(record_path(record))
        except (ValueError, KeyError, TypeError):
            raise OutputError(
                f"cannot resume: line {n} of {shown} is not an i2v record (edited since?); leave out --resume "
                "to start over"
            ) from None
        keep = offset + len(line)
    return Progress(done, keep)


def _csv_progress(output: str, shown: str) -> Progress:
    lines = _lines(output)
    try:
        _, header = next(lines)
    except StopIteration:
        return Progress(set(), 0)
    if header.decode("utf-8", "replace").rstrip("\r\n").split(",") != list(CSV_COLUMNS):
        raise OutputError(f"cannot resume: {shown} is not an i2v CSV file (header {','.join(CSV_COLUMNS)})")
    starts: list[int] = []
    position = {"next": len(header)}

    def text_lines() -> Iterator[str]:
        for offset, line in lines:
            position["next"] = offset + len(line)
            yield line.decode("utf-8")

    done: set[str] = set()
    last_path, last_start, keep = None, len(header), len(header)
    try:
        reader = csv.reader(text_lines())
        start = len(header)
        for row in reader:
            if len(row) != len(CSV_COLUMNS):
                raise ValueError
            path = record_path({"path": row[0], "path_b64": row[5]})
            if path != last_path:
                if last_path is not None:
                    done.add(last_path)
                last_path, last_start = path, start
            starts.append(start)
            start = position["next"]
        keep = last_start  # the last image's rows may be incomplete: written again
    except (ValueError, UnicodeDecodeError, csv.Error):
        raise OutputError(f"cannot resume: {shown} has a row that is not i2v's (edited since?)") from None
    return Progress(done, keep if last_path is not None else len(header))


@contextlib.contextmanager
def claim_output(output: str | None, job: Mapping[str, Any], *, resume: bool = False) -> Iterator[Progress]:
    """Hold ``output`` for one run of ``job``: refuse it when another run holds it, check (``resume``) that
    it is this job's and read what it holds, then record the job's status (running, interrupted, complete,
    failed) in its job file. Yields what an earlier run did (nothing without ``resume``). Stdout, devices and
    FIFOs are not locked and cannot be resumed."""
    fmt = job.get("output_format", "")
    if writes_in_place(output):
        if resume:
            raise OutputError("--resume needs -o FILE, a regular file: the output of the run to resume")
        yield Progress(set(), 0)
        return
    assert output is not None
    lock = JobLock(output, dict(job))
    try:
        progress = Progress(set(), 0)
        if resume:
            if fmt not in RESUMABLE:
                raise OutputError(
                    f"--resume needs --format jsonl or csv (a JSON list cannot be appended to), not {fmt}"
                )
            exists = os.path.exists(output) and (os.path.getsize(output) > 0 or fmt == "npy")
            check_resumable(lock, exists)
            if exists and fmt != "npy":
                progress = read_progress(output, fmt)
        lock.record("running")
        try:
            yield progress
        except KeyboardInterrupt:
            lock.record("interrupted")
            raise
        except BaseException:
            with contextlib.suppress(OutputError):
                lock.record("failed")
            raise
        lock.record("complete")
    finally:
        lock.release()
