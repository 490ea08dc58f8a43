"""``i2v tag``: tags of every image, thresholded per category, as JSON, JSONL or CSV."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import click

from ..captions import CaptionOptions, check_collisions, common_root, write_caption
from ..config import TAG
from ..errors import CaptionError
from ..inputs import expand_inputs
from ..resume import completed_paths
from ..runner import resolve_device, run_model
from ..tags import Selection, load_tag_list, tag_record
from ..weights import load_model, resolve_weights
from ..writers import FORMATS, open_writer
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    F,
    UsageFailure,
    default_workers,
    input_options,
    model_options,
    progress_bar,
    progress_option,
    report_failure,
)
from .ray_options import engine_options, run_engine

_SCORE = click.FloatRange(0.0, 1.0)


def caption_options(f: F) -> F:
    """--captions and the options that shape caption files (for dataset preparation)."""
    options = [
        click.option("--captions", is_flag=True, help="Write a caption file of tags beside each image."),
        click.option("--captions-dir", type=click.Path(file_okay=False), metavar="DIR",
                     help="Write caption files here instead, mirroring the input folders (implies --captions)."),
        click.option("--caption-ext", default=".txt", show_default=True, help="Caption file extension."),
        click.option("--caption-sep", default=", ", show_default=True, help="Separator between tags."),
        click.option("--underscores", is_flag=True, help="Write tags with underscores (long_hair), not spaces."),
        click.option("--exclude", multiple=True, metavar="TAGS",
                     help="Leave these tags out (repeatable, or comma-separated; either spelling)."),
        click.option("--character-first", is_flag=True, help="Character, then copyright, then general tags."),
        click.option("--rating-tag", is_flag=True, help="End each caption with the most likely rating."),
        click.option("--skip-existing", "existing", flag_value="skip", default=True,
                     help="Keep caption files that exist (the default)."),
        click.option("--overwrite", "existing", flag_value="overwrite", help="Replace existing caption files."),
        click.option("--append", "existing", flag_value="append",
                     help="Add the new tags to existing caption files, without duplicates."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def make_caption_options(params: dict[str, Any], inputs: list[str], folders: list[str]) -> CaptionOptions | None:
    """The caption settings asked for on the command line, or None when no captions are wanted."""
    if not (params["captions"] or params["captions_dir"]):
        return None
    root = None
    if params["captions_dir"]:
        root = Path(folders[0]) if len(folders) == 1 else common_root(inputs)
    exclude = frozenset(t.strip() for spec in params["exclude"] for t in spec.split(",") if t.strip())
    options = CaptionOptions(
        extension=params["caption_ext"],
        separator=params["caption_sep"],
        underscores=params["underscores"],
        exclude=exclude,
        character_first=params["character_first"],
        rating=params["rating_tag"],
        existing=params["existing"],
        captions_dir=params["captions_dir"],
        root=root,
    )
    check_collisions(inputs, options)
    return options


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
    type=click.Choice([*FORMATS, "parquet"]),
    help="Output format (parquet: --engine ray only). Default: from -o's extension, else jsonl.",
)
@click.option("--output", "-o", metavar="FILE", help="Write here instead of stdout.")
@click.option(
    "--resume",
    is_flag=True,
    help="With -o FILE (jsonl or csv): skip the images FILE already has and append the rest.",
)
@click.option("--tags", "tag_list", metavar="FILE", help="Tag list (JSON list of 1,539 tags). Default: the release's.")
@caption_options
@model_options
@progress_option
@engine_options
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
    precision: str,
    backend: str,
    progress: bool | None,
    **caption_params: Any,
) -> None:
    """Tag images: files, folders, glob patterns, or '-' to read paths from stdin.

    Rating always lists safe, questionable and explicit with their scores. Every image gets a record,
    in input order; one that cannot be read gets {"path", "error"} and the exit status is 1.

    With --captions (or --captions-dir) a caption file of comma-separated tags, best first, is written per
    image; records then go to stdout only when --format or -o asks for them.

    \b
    Examples:
      i2v tag ./illustrations --threshold 0.5 -o tags.json
      i2v tag a.jpg b.png --top-k 5 --format csv
      find . -name '*.jpg' -print0 | i2v tag - -0 --format jsonl | jq .general
      i2v tag ./dataset -r --captions --threshold 0.4 --exclude "simple background" --underscores
      i2v tag ./dump -r --engine ray --ray-address head:6379 -f parquet -o tags/
    """
    if run_engine(TAG):
        return
    selection = Selection.make(
        threshold,
        general=general_threshold,
        character=character_threshold,
        copyright=copyright_threshold,
        top_k=top_k,
    )
    inputs = expand_inputs(paths, recursive=recursive, stdin=sys.stdin.buffer if "-" in paths else None, nul=nul)
    captions = make_caption_options(caption_params, inputs, [p for p in paths if os.path.isdir(p)])
    dev = resolve_device(device)
    model, _ = load_model(resolve_weights(weights, TAG), kind=TAG, device=str(dev))
    tags = load_tag_list(tag_list)
    wants_records = captions is None or fmt is not None or output is not None
    fmt = output_format(fmt, output)
    if resume:
        if output is None:
            raise UsageFailure("--resume needs -o FILE: the output of the run to resume")
        done = completed_paths(output, fmt)
        inputs = [p for p in inputs if p not in done]
    try:
        writer = open_writer(fmt, output, append=resume) if wants_records else None
    except OSError as exc:
        raise UsageFailure(f"cannot write {output}: {exc.strerror}") from None

    failed = 0
    outcomes: Counter[str] = Counter()
    with writer or contextlib.nullcontext(), progress_bar(len(inputs), progress) as bar:
        results = run_model(
            model,
            inputs,
            batch_size=batch_size,
            workers=default_workers() if workers is None else workers,
            on_progress=bar.update,
            precision=precision,
            backend=backend,
        )
        for batch in results:
            records = [tag_record(r.path, r.output, r.error, tags, selection) for r in batch]
            if writer is not None:
                writer.write(records)
            for record in records:
                error = record.get("error")
                if error is None and captions is not None:
                    try:
                        outcomes[write_caption(record, captions)] += 1
                    except CaptionError as exc:
                        error = str(exc)
                if error is not None:
                    failed += 1
                    report_failure(bar, record["path"], error)
    if outcomes:
        click.echo("i2v: captions " + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())), err=True)
        if outcomes["skipped"]:
            click.echo("i2v: existing caption files were kept: use --overwrite or --append to change them", err=True)
    if failed:
        click.echo(f"i2v: {failed} of {len(inputs)} inputs failed", err=True)
        sys.exit(EXIT_SOME_FAILED)
