"""``i2v features``: the semantic feature of every image, to a ``.npy`` with its paths file, or as JSON lines."""

from __future__ import annotations

import os
import sys
import time

import click

from ..config import FEATURE
from ..errors import I2VError
from ..inputs import expand_inputs
from ..store import model_identity
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    MODEL_SECTION,
    RAY_SECTION,
    SectionedCommand,
    UsageFailure,
    default_workers,
    echo,
    input_options,
    model_options,
    progress_bar,
    progress_option,
    report_batch,
    stdin_for,
)
from .ray_options import engine_options, run_engine

FEATURE_FORMATS = ("npy", "jsonl")


@click.command(
    cls=SectionedCommand,
    context_settings=CONTEXT_SETTINGS,
    sections={"The network": MODEL_SECTION, "Ray cluster (--engine ray)": RAY_SECTION},
)
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
@click.option(
    "--resume",
    is_flag=True,
    help="With -o FILE: skip the images FILE already has and add the rest (ray: keep the shards done).",
)
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
    resume: bool,
    weights: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    decode: str,
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
    # The library is imported here, not at the top: `i2v features -h` answers without loading torch.
    from ..features import FeatureJsonlWriter, FeatureWriter, paths_file_for
    from ..resume import claim_output, make_job
    from ..writers import check_output, display, format_for, writes_in_place

    if run_engine(FEATURE):
        return
    started = time.perf_counter()
    try:
        fmt = format_for(fmt, output, FEATURE_FORMATS, "jsonl" if writes_in_place(output) else "npy")
        if fmt == "npy" and writes_in_place(output):
            raise UsageFailure("--format npy writes a file: give -o FILE.npy (its paths go to FILE.paths.jsonl)")
        if fmt == "npy" and os.path.splitext(output or "")[1].lower() != ".npy":
            raise UsageFailure(
                f"-o {display(str(output))}: name the vectors file FILE.npy (paths go to FILE.paths.jsonl)"
            )
        inputs = expand_inputs(paths, recursive=recursive, stdin=stdin_for(paths), nul=nul)
        check_output(output, inputs, writes=("npy",) if fmt == "npy" else ("text",))
        if fmt == "npy":
            check_output(str(paths_file_for(str(output))), inputs, pair=True)
        # torch comes with these: imported once the cheap checks passed, so a usage error answers at once.
        from ..gpudecode import check_gpu_decoding
        from ..inference import describe, prepare_for_inference, resolve_backend
        from ..pipeline import FeatureRecords, run_job
        from ..runner import resolve_device
        from ..weights import load_model, resolve_weights

        dev = resolve_device(device)
        resolve_backend(backend, dev, precision)
        check_gpu_decoding(decode, dev)
        model, info = load_model(resolve_weights(weights, FEATURE), kind=FEATURE, device=str(dev))
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    dim = model.arch.feature_dim
    model_id = model_identity(info)
    settings = {"binary": binary, "precision": precision, **({"decode": decode} if decode != "cpu" else {})}
    job = make_job("features", fmt, settings, model_id)
    with claim_output(output, job, resume=resume) as earlier:
        sink: FeatureWriter | FeatureJsonlWriter
        if fmt == "npy":
            sink = FeatureWriter(str(output), dim=dim, binary=binary, model=model_id, resume=resume)
            done = sink.done
        else:
            sink = FeatureJsonlWriter(output, keep=earlier.keep or None)
            done = earlier.done
        todo = [p for p in inputs if p not in done] if done else inputs
        net = prepare_for_inference(model, precision=precision, backend=backend)
        with progress_bar(len(todo), progress) as bar:
            try:
                summary = run_job(
                    model,
                    todo,
                    records=FeatureRecords(binary),
                    sink=sink,
                    batch_size=batch_size,
                    workers=default_workers(model) if workers is None else workers,
                    net=net,
                    on_batch=lambda records: report_batch(bar, records),
                    decode=decode,
                )
            except KeyboardInterrupt:
                if isinstance(sink, FeatureWriter):
                    echo(None, f"i2v: {display(str(output))} holds the {sink.rows} features done of {len(inputs)}")
                raise
    failed = len(summary.failures)
    seconds = time.perf_counter() - started
    skipped = f", {len(inputs) - len(todo)} already in {display(str(output))}" if len(todo) < len(inputs) else ""
    what = f"binary features of {dim} bits" if binary else f"float32 features of {dim}"
    where = f" to {display(str(output))} (paths: {display(str(paths_file_for(str(output))))})" if fmt == "npy" else ""
    echo(None, f"i2v: wrote {summary.processed - failed} {what}{where}{skipped} in {seconds:.1f} s ({describe(net)})")
    if failed:
        left_out = " (they have no row)" if fmt == "npy" else ""
        echo(None, f"i2v: {failed} of {len(todo)} inputs failed{left_out}")
        sys.exit(EXIT_SOME_FAILED)
