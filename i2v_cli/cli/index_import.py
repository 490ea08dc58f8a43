"""``i2v index --import FOLDER...``: Ray output folders into an index (see :mod:`i2v_cli.index_import`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from ..errors import I2VError
from ..index import Index
from ..index_import import ImportFolderError, import_ray, import_source
from ..resume import JobLock, make_job
from ..writers import display
from .common import EXIT_SOME_FAILED, UsageFailure, echo, report_failure


def run_import(db: str, folders: tuple[str, ...], fmt: str) -> None:
    """Import, report failures on stderr, print the summary (JSON on stdout with ``--format json``). Folders that
    cannot be imported are refused before the index (or its job file) is made."""
    try:
        source = import_source(folders)
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    lock = JobLock(db, make_job("index", "sqlite", {"import": list(folders)}, {}))
    made = not os.path.exists(db)  # under the lock, so no other run makes it meanwhile; through a symlink
    target = os.path.realpath(db)
    try:
        with Index(db, create=True) as idx:
            summary = import_ray(idx, source)
    except I2VError as exc:
        if not made:  # as a killed run leaves it: what was committed is whole, and a rerun goes on from it
            kept = f" ({display(db)} keeps the rows imported before it)" if isinstance(exc, ImportFolderError) else ""
            raise UsageFailure(f"{exc}{kept}") from None
        # A shard found damaged midway: the index this run made holds part of it, and is no one's. A symlink the
        # user gave as --db stays; the file it leads to, which this run made, goes.
        for path in {target, f"{target}-wal", f"{target}-shm", f"{db}-wal", f"{db}-shm", str(lock.path)}:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise UsageFailure(str(exc)) from None
    finally:
        lock.release()
    for path, error in summary.failures:
        report_failure(None, path, error)
    if fmt == "json":
        click.echo(json.dumps(summary.counts()))
    echo(None, f"i2v: {display(db)}: " + ", ".join(f"{v} {k}" for k, v in summary.counts().items()))
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)
