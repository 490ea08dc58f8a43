"""``i2v search``: the images of an index matching a tag query, or the most similar to an image among them."""

from __future__ import annotations

import os

import click

from ..config import FEATURE
from ..errors import I2VError
from ..index import Index
from ..query import Hit, like_row, parse
from ..query import search as run_search
from ..store import how_weights_differ, model_identity, same_weights
from ..writers import display, one_line, open_writer
from .common import CONTEXT_SETTINGS, SCORE, UsageFailure
from .index import db_option


def write_hits(hits: list[Hit], fmt: str) -> None:
    """Results to stdout: text (a path a line, control characters escaped, with the score after a tab), or JSON/JSONL
    records (the exact names)."""
    if fmt == "text":
        # A path a line: a newline or tab in a name is escaped, as in `similar` (it split one path over two lines).
        lines = [one_line(h.path) if h.score is None else f"{one_line(h.path)}\t{h.score:.6f}" for h in hits]
        if lines:
            click.echo("\n".join(lines))
        return
    with open_writer(fmt, None) as writer:
        writer.write({"path": h.path} if h.score is None else {"path": h.path, "score": h.score} for h in hits)


def query_feature(index: Index, image: str, feature_weights: str | None, device: str) -> tuple[int | None, object]:
    """The feature of ``--like IMAGE``: stored when the image is indexed, else computed with the feature model."""
    row, feature = like_row(index, image)
    if feature is not None:
        return row, feature
    if not os.path.isfile(image):
        what = "not a file (a folder, a device or a pipe)" if os.path.exists(image) else "no such file"
        raise UsageFailure(f"--like {display(image)}: {what}, and not an indexed path")

    from ..runner import resolve_device, run_model
    from ..weights import load_model, resolve_weights

    model, info = load_model(
        resolve_weights(feature_weights, FEATURE, "--feature-weights"), kind=FEATURE, device=str(resolve_device(device))
    )
    stored = index.model_record("feature_model")
    if stored.get("sha256") is not None and not same_weights(stored, model_identity(info)):
        raise UsageFailure(
            f"--feature-weights {info.source} is not the feature model the index was made with "
            f"({stored.get('source')}; {how_weights_differ(stored, model_identity(info))})"
        )
    ((result,),) = list(run_model(model, [image], batch_size=1))
    if result.output is None:
        raise UsageFailure(f"--like: {result.error}")
    return None, result.output


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("query", nargs=-1)
@db_option
@click.option("--like", metavar="IMAGE", help="Rank by similarity to this image (an indexed path, or any image file).")
@click.option("-k", "k", type=click.IntRange(1), default=None,
              help="At most K results. Default: all matches; 10 with --like.")  # fmt: skip
@click.option(
    "--threshold", "-t", type=SCORE, default=0.5, show_default=True, help="The score a bare tag term must reach."
)
@click.option("--format", "-f", "fmt", type=click.Choice(["text", "json", "jsonl"]), default="text", show_default=True)
@click.option("--feature-weights", metavar="FILE", help="Feature model for a --like image that is not indexed.")
@click.option(
    "--exact",
    is_flag=True,
    help="With --like, score every match on its full feature (slower on a large index; by default more than "
    "2,000 matches are ranked by their 512-byte sketches first).",
)
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]")
def search(
    query: tuple[str, ...],
    db: str,
    like: str | None,
    k: int | None,
    threshold: float,
    fmt: str,
    feature_weights: str | None,
    exact: bool,
    device: str,
) -> None:
    """Search an index by tags (QUERY) and/or by similarity (--like IMAGE).

    QUERY: terms that must all hold. long_hair (underscores, or double quotes, for spaces) means the score is
    at least --threshold; tag>=0.8, tag<0.2 set their own bound; -term negates; rating:safe means safe is
    the highest rating. Without --like: the matches in path order; with it: the K most similar matches.

    \b
    Examples:
      i2v search 'long_hair blue_eyes -glasses rating:safe' --db collection.db
      i2v search 'hatsune_miku>=0.8' --db collection.db --format jsonl
      i2v search --like ./new.png -k 20 'rating:safe' --db collection.db
      i2v search --db collection.db -- '-rating:explicit solo'   (-- before a query that starts with -)
    """
    try:
        with Index(db, readonly=True) as idx:
            terms = parse(" ".join(query), idx.tags, threshold)
            row = feature = None
            if like is not None:
                row, feature = query_feature(idx, like, feature_weights, device)
            hits = run_search(idx, terms, like=feature, exclude=row, k=k, exact=exact)  # type: ignore[arg-type]
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    write_hits(hits, fmt)
