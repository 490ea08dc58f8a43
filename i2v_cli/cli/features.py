"""``i2v features``: the semantic feature of every image, to a ``.npy`` with its paths file, or as JSON lines."""

from __future__ import annotations

import os
import sys

import click
import numpy as np

from ..config import FEATURE
from ..features import FeatureJsonlWriter, FeatureWriter, binarize, paths_file_for
from ..inputs import expand_inputs
from ..runner import resolve_device, run_model
from ..weights import load_model, resolve_weights
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
from .ray_options import engine_options, run_engine

FEATURE_FORMATS = ("npy", "jsonl")


def feature_format(fmt: str | None, output: str | None) -> str:
    """The format asked for, else ``jsonl`` for stdout or a ``.jsonl`` file, else ``npy``."""
    if fmt:
        return fmt
    if output is None or os.path.splitext(output)[1].lower() == ".jsonl":
        return "jsonl"
    return "npy"


@click.command(context_settings=CONTEXT_SETTINGS)
@input_options
@click.option("--output", "-o", metavar="FILE", help="Write here (FILE.npy plus FILE.paths.jsonl for npy).")
@click.option(
    "--binary",
    is_flag=True,
    help="Binary features: packbits(sigmoid(encode1) > 0.5), uint8 (N, 512), instead of float32 (N, 4096).",
)
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(FEATURE_FORMATS),
    help="npy: vectors + paths file (needs -o); jsonl: {path, feature} lines. "
    "Default: jsonl on stdout or for a .jsonl file, else npy.",
)
@click.option("--resume", is_flag=True, help="[ray] Keep the shards already in the -o folder and do the rest.")
@model_options
@progress_option
@engine_options
def features(
    paths: tuple[str, ...],
    recursive: bool,
    nul: bool,
    output: str | None,
    binary: bool,
    fmt: str | None,
    weights: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    precision: str,
    backend: str,
    progress: bool | None,
    **engine: object,
) -> None:
    """Extract semantic features (the feature model's encode1) of images: files, folders, glob patterns,
    or '-' to read paths from stdin.

    With -o vecs.npy, row i of vecs.npy is the image on line i+2 of vecs.paths.jsonl (line 1 is a header);
    images that cannot be read get no row, are reported on stderr, and the exit status is 1. Both files
    appear when the run is done.

    \b
    Examples:
      i2v features ./illustrations -o vecs.npy
      i2v features ./illustrations --binary -o bits.npy
      i2v features a.png b.png --format jsonl | jq -c '.feature[:4]'
      i2v features ./dump -r --engine ray --ray-address head:6379 -o features/
    """
    if run_engine(FEATURE):
        return
    fmt = feature_format(fmt, output)
    if fmt == "npy" and output is None:
        raise UsageFailure("--format npy writes a file: give -o FILE.npy (its paths go to FILE.paths.jsonl)")
    inputs = expand_inputs(paths, recursive=recursive, stdin=sys.stdin.buffer if "-" in paths else None, nul=nul)
    dev = resolve_device(device)
    model, info = load_model(resolve_weights(weights, FEATURE), kind=FEATURE, device=str(dev))
    dim = model.arch.feature_dim
    sink: FeatureWriter | FeatureJsonlWriter
    if fmt == "npy":
        sink = FeatureWriter(output, dim=dim, binary=binary, model={"source": info.source, "sha256": info.sha256})
    else:
        try:
            sink = FeatureJsonlWriter(output)
        except OSError as exc:
            raise UsageFailure(f"cannot write {output}: {exc.strerror}") from None

    failed = 0
    try:
        with sink, progress_bar(len(inputs), progress) as bar:
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
                ok = [r for r in batch if r.output is not None]
                vectors = np.stack([r.output for r in ok]) if ok else np.zeros((0, dim), np.float32)
                if binary:
                    vectors = binarize(vectors)
                if isinstance(sink, FeatureWriter):
                    sink.write([r.path for r in ok], vectors)
                else:
                    rows = iter(vectors)
                    sink.write(
                        {"path": r.path, "feature": next(rows)}
                        if r.output is not None
                        else {"path": r.path, "error": r.error or "no output"}
                        for r in batch
                    )
                for r in batch:
                    if r.output is None:
                        failed += 1
                        report_failure(bar, r.path, r.error or "no output")
    except KeyboardInterrupt:
        if isinstance(sink, FeatureWriter):
            click.echo(f"i2v: interrupted: {output} holds the {sink.rows} features done of {len(inputs)}", err=True)
        raise
    if isinstance(sink, FeatureWriter):
        what = f"binary features of {dim} bits" if binary else f"float32 features of {dim}"
        click.echo(f"i2v: wrote {sink.rows} {what} to {output} (paths: {paths_file_for(output)})", err=True)
    if failed:
        left_out = " (they have no row)" if fmt == "npy" else ""
        click.echo(f"i2v: {failed} of {len(inputs)} inputs failed{left_out}", err=True)
        sys.exit(EXIT_SOME_FAILED)
