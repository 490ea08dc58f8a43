"""``i2v export``: the tags of an index as sidecar files beside the images (XMP keywords, Hydrus tag files)."""

from __future__ import annotations

import json
import sys

import click

from ..errors import I2VError, WriteError
from ..index import Index
from ..sidecars import SIDECAR_KINDS
from ..sidecars import export as write_sidecars
from ..tags import Selection
from .common import CONTEXT_SETTINGS, EXIT_SOME_FAILED, SCORE, UsageFailure, echo, report_failure
from .index import db_option


@click.command(context_settings=CONTEXT_SETTINGS)
@db_option
@click.option(
    "--to",
    "kind",
    type=click.Choice(SIDECAR_KINDS),
    required=True,
    help="xmp: IMAGE.xmp with dc:subject keywords; hydrus: IMAGE.txt, a tag a line (import folders).",
)
@click.option(
    "--threshold",
    "-t",
    type=SCORE,
    default=0.5,
    show_default=True,
    help="Export general/character/copyright tags scoring at least this.",
)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one summary object on stdout {written, unchanged, skipped, failed}.",
)
def export(db: str, kind: str, threshold: float, fmt: str) -> None:
    """Write the tags of every indexed image into a sidecar file beside it.

    Existing sidecars are merged: their tags stay and the new ones are added (nothing is removed; other XMP
    properties are kept). A sidecar that cannot be parsed is left as it is and reported (exit status 1).

    \b
    Examples:
      i2v export --db collection.db --to xmp            # then: exiftool -XMP-dc:Subject img.png.xmp
      i2v export --db collection.db --to hydrus -t 0.35
    """
    try:
        with Index(db, readonly=True) as idx:
            summary = write_sidecars(idx, kind, Selection.make(threshold))
    except WriteError:  # a full disk: exit 3 (the group says so)
        raise
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    for path, error in summary.failures:
        report_failure(None, path, error)
    if fmt == "json":
        click.echo(json.dumps(summary.counts()))
    counts = ", ".join(f"{v} {k}" for k, v in summary.counts().items())
    echo(None, f"i2v: {kind} sidecars: {counts}")
    if summary.failures:
        sys.exit(EXIT_SOME_FAILED)
