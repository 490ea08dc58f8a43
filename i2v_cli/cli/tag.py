"""``i2v tag``: tags of every image, thresholded per category, as JSON, JSONL or CSV (and caption files)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import click
from click.core import ParameterSource

from ..captions import already_captioned, caption_request, check_captions_dir, tag_key
from ..config import TAG
from ..errors import I2VError
from ..inputs import expand_inputs
from ..store import file_identity, model_identity, resolve_weights
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    MODEL_SECTION,
    RAY_SECTION,
    SCORE,
    F,
    SectionedCommand,
    UsageFailure,
    check_decode,
    default_workers,
    echo,
    input_options,
    model_options,
    progress_bar,
    progress_option,
    recall_session,
    recall_while_importing,
    report_batch,
    report_failure,
    runs_without_torch,
    stdin_for,
)
from .ray_options import engine_options, run_engine


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
        click.option("--skip-existing", is_flag=True,
                     help="Keep caption files that exist (the default; without -o, their images are not run again)."),
        click.option("--overwrite", is_flag=True, help="Replace existing caption files."),
        click.option("--append", is_flag=True,
                     help="Add the new tags to existing caption files, without duplicates."),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def _torch_network(
    weights_path: Any, device: str, backend: str, precision: str
) -> tuple[Any, Any, dict[str, Any], bool, list[int] | None]:
    """The torch path's network: ``(model, net, info, onnx, before)``. ``net`` is a session on the recorded export
    (``model`` None) when there is one, else None and ``model`` the loaded weights (``before``: the weight file's
    identity before it was read, for :func:`i2v_cli.ortcache.remember_export`); ``onnx``: the run is fp32 in ONNX
    Runtime."""
    recalled = recall_while_importing(weights_path, device, backend, precision)
    # torch comes with these: imported once the cheap checks passed, so a usage error answers at once.
    import torch

    from ..inference import OnnxRuntimeNet, resolve_backend
    from ..ortcache import open_cached
    from ..runner import resolve_device
    from ..weights import load_model

    dev = resolve_device(device)
    onnx = resolve_backend(backend, dev, precision) == "onnxruntime" and precision == "fp32"
    if recalled is not None and onnx and dev.type == "cpu":
        threads, session, export, info = recalled
        if threads != torch.get_num_threads():  # the guess was off (torch may count cores, not CPUs)
            session = open_cached(export, torch.get_num_threads())
        if session is not None:
            return None, OnnxRuntimeNet.from_session(session, export), info, onnx, None
    before = file_identity(weights_path)
    model, weights_info = load_model(weights_path, kind=TAG, device=str(dev))
    return model, None, weights_info.as_dict(), onnx, before


def tags_digest(tags: list[str]) -> str:
    """SHA-256 of a tag list: what a job file records of it."""
    return "sha256:" + hashlib.sha256(json.dumps(tags, ensure_ascii=False).encode()).hexdigest()


@click.command(
    cls=SectionedCommand,
    context_settings=CONTEXT_SETTINGS,
    sections={
        "Caption files": ("captions", "captions_dir", "caption_ext", "caption_sep", "underscores", "exclude",
                          "character_first", "rating_tag", "skip_existing", "overwrite", "append"),
        "The network": MODEL_SECTION,
        "Ray cluster (--engine ray)": RAY_SECTION,
    },
)  # fmt: skip
@input_options
@click.option(
    "--threshold",
    "-t",
    type=SCORE,
    default=None,
    help="Keep general/character/copyright tags scoring at least this. [default: 0.5, or 0 with --top-k]",
)
@click.option("--general-threshold", type=SCORE, help="Threshold for general tags (overrides --threshold).")
@click.option("--character-threshold", type=SCORE, help="Threshold for character tags.")
@click.option("--copyright-threshold", type=SCORE, help="Threshold for copyright tags.")
@click.option("--top-k", "-k", type=click.IntRange(1), help="Keep at most K tags per category, best first.")
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["json", "jsonl", "csv", "parquet"]),
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
    decode: str,
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
    # The library is imported here, not at the top: `i2v tag -h` answers without loading torch.
    from ..pipeline import CaptionSink, TagRecords, run_job
    from ..resume import claim_output, make_job
    from ..tags import Selection, load_tag_list
    from ..writers import Tee, check_output, display, format_for, open_writer, writes_in_place

    if run_engine(TAG):
        return
    started = time.perf_counter()
    selection = Selection.make(
        threshold,
        general=general_threshold,
        character=character_threshold,
        copyright=copyright_threshold,
        top_k=top_k,
    )
    captions_wanted = caption_params["captions"] or caption_params["captions_dir"]
    wants_records = not captions_wanted or fmt is not None or output is not None
    ctx = click.get_current_context()
    try:
        fmt = format_for(fmt, output, ("json", "jsonl", "csv"), "jsonl")
        inputs = expand_inputs(paths, recursive=recursive, stdin=stdin_for(paths), nul=nul)
        if wants_records:
            check_output(output, inputs, writes=None)  # its content once the weights are known (below)
        tags = load_tag_list(tag_list)
        given = {n for n in caption_params if ctx.get_parameter_source(n) is ParameterSource.COMMANDLINE}
        request = caption_request(
            caption_params,
            inputs,
            [p for p in paths if os.path.isdir(p)],
            tags=tags,
            outputs=[output] if wants_records and not writes_in_place(output) else [],
            given=given,
        )
        for warning in request.warnings:
            echo(None, f"i2v: warning: {warning}")
        captions = request.options
        captioned = already_captioned(inputs, captions) if captions is not None and not wants_records else []
        if captioned:  # their captions are there and no records are asked for: nothing to compute for them
            done = set(captioned)
            inputs = [p for p in inputs if p not in done]
        keys = {tag_key(t) for t in request.exclude}
        exclude = frozenset(t for t in tags if tag_key(t) in keys)
        weights_path = resolve_weights(weights, TAG)
        if wants_records:  # the run reads these too (the weights not at all on the torch-free path): keep them
            check_output(output, [os.fspath(weights_path), *([tag_list] if tag_list else [])])
        # A weight file whose ONNX export an earlier run recorded is not read at all. A run of one batch on it
        # needs no torch (about 1 CPU-second): its reader and its session take NumPy arrays. Other runs open the
        # session while torch is imported beside it (about 0.3 + 0.3 s of a one-image run on a 2-core CPU); which
        # backend runs is checked once torch is there, and a wrong guess costs only the session.
        model: Any = None
        net: Any = None
        onnx, before = False, None
        if decode == "cpu" and runs_without_torch(device, backend, precision, workers, len(inputs), batch_size):
            found = recall_session(weights_path)
            if found is not None:
                net, info = found
        if net is None:
            model, net, info, onnx, before = _torch_network(weights_path, device, backend, precision)
        check_decode(decode, model)
        check_captions_dir(captions)  # it makes the folder: only once every option and the network are known good
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    except OSError as exc:  # the weight file vanished between finding and reading it
        raise UsageFailure(f"cannot read the weights: {exc}") from None
    job = make_job(
        "tag",
        fmt,
        {
            "thresholds": dict(selection.thresholds),
            "top_k": selection.top_k,
            "tag_list": tags_digest(tags),
            "exclude": sorted(exclude),
            "precision": precision,
            **({"decode": decode} if decode != "cpu" else {}),  # its inputs are not the CPU's
        },
        model_identity(info),
    )
    caption_sink = CaptionSink(captions) if captions is not None else None
    if caption_sink is not None and captioned:
        caption_sink.outcomes["skipped"] += len(captioned)
    with claim_output(output if wants_records else "-", job, resume=resume) as earlier:
        todo = [p for p in inputs if p not in earlier.done] if earlier.done else inputs
        if net is None:
            from ..inference import OnnxRuntimeNet, prepare_for_inference
            from ..ortcache import remember_export

            net = prepare_for_inference(model, precision=precision, backend=backend)
            if onnx and isinstance(net, OnnxRuntimeNet):
                remember_export(weights_path, before, info, net.export)
        writer = open_writer(fmt, output, keep=earlier.keep or None) if wants_records else None
        with progress_bar(len(todo), progress) as bar:

            def report(records: list[dict[str, Any]]) -> None:
                report_batch(bar, records)
                if caption_sink is not None:
                    for path, error in caption_sink.errors[reported[0] :]:
                        report_failure(bar, path, error)
                    reported[0] = len(caption_sink.errors)

            reported = [0]
            summary = run_job(
                model,
                todo,
                records=TagRecords(tags, selection, exclude),
                # Captions first: a record reaches -o only once its image's caption is written (or failed), so
                # that --resume after a kill, which skips the recorded images, leaves none without its caption.
                sink=Tee(caption_sink, writer),
                batch_size=batch_size,
                workers=default_workers(model) if workers is None else workers,
                net=net,
                on_batch=report,
                decode=decode,
            )
    failed = len(summary.failures) + (len(caption_sink.errors) if caption_sink is not None else 0)
    seconds = time.perf_counter() - started
    skipped = f", {len(inputs) - len(todo)} already in {display(output or '')}" if len(todo) < len(inputs) else ""
    where = f"; records in {display(output)}" if wants_records and output not in (None, "-") else ""
    echo(None, f"i2v: tagged {summary.processed - len(summary.failures)} of {len(todo)} images{skipped} in "
               f"{seconds:.1f} s ({net.describe()}){where}")  # fmt: skip
    if caption_sink is not None and caption_sink.outcomes:
        outcomes = caption_sink.outcomes
        echo(None, "i2v: captions " + ", ".join(f"{n} {what}" for what, n in sorted(outcomes.items())))
        if outcomes["skipped"]:
            echo(None, "i2v: existing caption files were kept: use --overwrite or --append to change them")
    if failed:
        echo(None, f"i2v: {failed} of {len(todo)} inputs failed")
        sys.exit(EXIT_SOME_FAILED)
