"""``i2v dupes``: groups of near-duplicate images in an index, each with the copy to keep. Only reports."""

from __future__ import annotations

import click

from ..dupes import DEFAULT_MIN_SIMILARITY, find_dupes
from ..errors import I2VError
from ..index import Index
from ..writers import one_line, open_writer
from .common import CONTEXT_SETTINGS, FiniteRange, UsageFailure, progress_bar, progress_option
from .index import db_option


@click.command(context_settings=CONTEXT_SETTINGS)
@db_option
@click.option(
    "--min-similarity",
    "-s",
    type=FiniteRange(-1.0, 1.0),
    default=DEFAULT_MIN_SIMILARITY,
    show_default=True,
    help="Cosine similarity of the features from which two images are duplicates.",
)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["text", "json", "jsonl"]),
    default="text",
    show_default=True,
    help="jsonl: one group a line, {keep, paths, min_similarity}; text: the kept copy, then the others.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Compare every pair of full features, however large the index (hours at a million images; by default "
    "above 10,000 images, 512-byte sketches choose the pairs to compare).",
)
@progress_option
def dupes(db: str, min_similarity: float, fmt: str, exact: bool, progress: bool | None) -> None:
    """Find groups of near-duplicates (re-encodes, resizes, small edits) in an index.

    Each group names the copy to keep: the largest resolution, then a lossless format (PNG, BMP, TIFF, GIF),
    then the oldest file. Nothing is deleted or moved.

    \b
    Examples:
      i2v dupes --db collection.db
      i2v dupes --db collection.db -s 0.98 -f jsonl | jq -r '.paths[1:][]'   # the copies not kept
    """
    try:
        with Index(db, readonly=True) as idx, progress_bar(None, progress, unit="list", desc="dupes") as bar:

            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            groups = find_dupes(idx, min_similarity, exact=exact, progress=advance)
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    if fmt == "text":
        lines = []
        for g in groups:
            lines.append(f"keep\t{one_line(g.keep.path)}")
            lines.extend(f"  dupe\t{one_line(o.path)}" for o in g.others)
        if lines:
            click.echo("\n".join(lines))
        return
    with open_writer(fmt, None) as writer:
        writer.write(g.record() for g in groups)
