"""``i2v tag``: tags of every image, thresholded per category, as JSON, JSONL or CSV."""

from __future__ import annotations

import os
import sys

import click

from ..config import TAG
from ..inputs import expand_inputs
from ..resume import completed_paths
from ..runner import resolve_device, run_model
from ..tags import Selection, load_tag_list, tag_record
from ..weights import load_model, resolve_weights
from ..writers import FORMATS, open_writer
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    UsageFailure,
    default_workers,
    input_options,
    model_options,
    progress_bar,
    progress_option,
    report_failure,
)

_SCORE = click.FloatRange(0.0, 1.0)


def output_format(fmt: str | None, output: str | None) -> str:
    """The format asked for, else the output file's extension, else JSONL (streams best on stdout)."""
    if fmt:
        return fmt
    ext = os.path.splitext(output or "")[1].lower().lstrip(".")
    return ext if ext in FORMATS else "jsonl"


@click.command(context_settings=CONTEXT_SETTINGS)
@input_options
@click.option(
    "--threshold",
    "-t",
    type=_SCORE,
    default=None,
    help="Keep general/character/copyright tags scoring at least this. [default: 0.5, or 0 with --top-k]",
)
@click.option("--general-threshold", type=_SCORE, help="Threshold for general tags (overrides --threshold).")
@click.option("--character-threshold", type=_SCORE, help="Threshold for character tags.")
@click.option("--copyright-threshold", type=_SCORE, help="Threshold for copyright tags.")
@click.option("--top-k", "-k", type=click.IntRange(1), help="Keep at most K tags per category, best first.")
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FORMATS),
    help="Output format. Default: from -o's extension, else jsonl.",
)
@click.option("--output", "-o", metavar="FILE", help="Write here instead of stdout.")
@click.option(
    "--resume",
    is_flag=True,
    help="With -o FILE (jsonl or csv): skip the images FILE already has and append the rest.",
)
@click.option("--tags", "tag_list", metavar="FILE", help="Tag list (JSON list of 1,539 tags). Default: the release's.")
@model_options
@progress_option
def tag(
    paths: tuple[str, ...],
    recursive: bool,
    nul: bool,
    threshold: float | None,
    general_threshold: float | None,
    character_threshold: float | None,
    copyright_threshold: float | None,
    top_k: int | None,
    fmt: str | None,
    output: str | None,
    resume: bool,
    tag_list: str | None,
    weights: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    progress: bool | None,
) -> None:
    """Tag images: files, folders, glob patterns, or '-' to read paths from stdin.

    Rating always lists safe, questionable and explicit with their scores. Every image gets a record,
    in input order; one that cannot be read gets {"path", "error"} and the exit status is 1.

    \b
    Examples:
      i2v tag ./illustrations --threshold 0.5 -o tags.json
      i2v tag a.jpg b.png --top-k 5 --format csv
      find . -name '*.jpg' -print0 | i2v tag - -0 --format jsonl | jq .general
    """
    selection = Selection.make(
        threshold,
        general=general_threshold,
        character=character_threshold,
        copyright=copyright_threshold,
        top_k=top_k,
    )
    inputs = expand_inputs(paths, recursive=recursive, stdin=sys.stdin.buffer if "-" in paths else None, nul=nul)
    dev = resolve_device(device)
    model, _ = load_model(resolve_weights(weights, TAG), kind=TAG, device=str(dev))
    tags = load_tag_list(tag_list)
    fmt = output_format(fmt, output)
    if resume:
        if output is None:
            raise UsageFailure("--resume needs -o FILE: the output of the run to resume")
        done = completed_paths(output, fmt)
        inputs = [p for p in inputs if p not in done]
    try:
        writer = open_writer(fmt, output, append=resume)
    except OSError as exc:
        raise UsageFailure(f"cannot write {output}: {exc.strerror}") from None

    failed = 0
    with writer, progress_bar(len(inputs), progress) as bar:
        results = run_model(
            model,
            inputs,
            batch_size=batch_size,
            workers=default_workers() if workers is None else workers,
            on_progress=bar.update,
        )
        for batch in results:
            writer.write(tag_record(r.path, r.output, r.error, tags, selection) for r in batch)
            for r in batch:
                if r.error is not None:
                    failed += 1
                    report_failure(bar, r.path, r.error)
    if failed:
        click.echo(f"i2v: {failed} of {len(inputs)} inputs failed", err=True)
        sys.exit(EXIT_SOME_FAILED)
