"""``i2v index --import FOLDER...``: Ray output folders into an index (see :mod:`i2v_cli.index_import`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys

import click

from ..errors import I2VError
from ..index import Index
from ..index_import import import_ray, import_source
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
    made = not os.path.lexists(db)
    lock = JobLock(db, make_job("index", "sqlite", {"import": list(folders)}, {}))
    try:
        with Index(db, create=True) as idx:
            summary = import_ray(idx, source)
    except I2VError as exc:
        if made:  # a shard found damaged midway: the index this run made holds part of it, and is no one's
            for path in (db, f"{db}-wal", f"{db}-shm", lock.path):
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
