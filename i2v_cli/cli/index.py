"""``i2v index``: keep a collection's tags and features in one SQLite file, computing only what changed."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ..config import FEATURE, TAG
from ..errors import I2VError
from ..index import CombinedNet, Index, Plan, update
from ..inputs import expand_inputs
from ..resume import JobLock, make_job
from ..store import model_identity
from ..writers import display
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    F,
    UsageFailure,
    check_decode,
    default_workers,
    echo,
    paths_options,
    progress_bar,
    progress_option,
    report_failure,
    run_options,
    stdin_for,
)


def db_option(f: F) -> F:
    """--db FILE: the index file."""
    return click.option("--db", required=True, metavar="FILE", help="The index: an SQLite file (made if missing).")(f)


def network_options(f: F) -> F:
    """--tag-weights, --feature-weights and how the networks run (:func:`~i2v_cli.cli.common.run_options`)."""
    weights = [
        click.option("--tag-weights", metavar="FILE",
                     help="Tag model weights. Default: $I2V_WEIGHTS, then the cache (`i2v weights download`)."),
        click.option("--feature-weights", metavar="FILE",
                     help="Feature model weights. Default: $I2V_WEIGHTS, then the cache."),
    ]  # fmt: skip
    f = run_options("networks", "Images per network call (and per commit).")(f)
    for option in reversed(weights):
        f = option(f)
    return f


def load_networks(tag_weights: str | None, feature_weights: str | None, device: str, precision: str,
                  backend: str) -> tuple[Any, CombinedNet, dict[str, str], dict[str, str], int]:  # fmt: skip
    """Both models, prepared: (tag model, combined net, tag model id, feature model id, feature length)."""
    from ..inference import prepare_for_inference, resolve_backend  # torch: only once a network must run
    from ..runner import resolve_device
    from ..weights import load_model, resolve_weights

    dev = resolve_device(device)
    resolve_backend(backend, dev, precision)
    tag_model, tag_info = load_model(resolve_weights(tag_weights, TAG, "--tag-weights"), kind=TAG, device=str(dev))
    feature_model, feature_info = load_model(
        resolve_weights(feature_weights, FEATURE, "--feature-weights"), kind=FEATURE, device=str(dev)
    )
    net = CombinedNet(
        prepare_for_inference(tag_model, precision=precision, backend=backend),
        prepare_for_inference(feature_model, precision=precision, backend=backend),
    )
    return (
        tag_model,
        net,
        model_identity(tag_info),
        model_identity(feature_info),
        feature_model.arch.feature_dim,
    )


@click.command(context_settings=CONTEXT_SETTINGS)
@paths_options(required=False)
@db_option
@click.option("--import", "imports", multiple=True, metavar="FOLDER",
              help="Load the output folders of `i2v tag -t 0 --engine ray` and `i2v features --engine ray` "
              "(repeatable: give the tag folder and the feature folder).")  # fmt: skip
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one summary object on stdout {added, updated, moved, removed, unchanged, failed}.",
)
@network_options
@progress_option
def index(
    paths: tuple[str, ...],
    db: str,
    recursive: bool,
    nul: bool,
    imports: tuple[str, ...],
    fmt: str,
    tag_weights: str | None,
    feature_weights: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    decode: str,
    precision: str,
    backend: str,
    progress: bool | None,
) -> None:
    """Index images into an SQLite file: tags (all 1,539 scores), feature and binary code of each.

    A second run computes only new and changed files; moved or renamed files are recognised by their content
    hash (no network run); files that are gone leave the index. A killed run keeps every batch it committed.

    \b
    Examples:
      i2v index ./illustrations -r --db collection.db
      i2v index ./illustrations -r --db collection.db --format json    # {"added": ..., ...}
      i2v index --import tags_out/ --import features_out/ --db collection.db
    """
    if imports:
        if paths:
            raise UsageFailure("give either PATH... or --import FOLDER, not both")
        if decode != "cpu":
            raise UsageFailure(f"--decode {decode}: --import reads records, it decodes no image")
        if recursive or nul:
            raise UsageFailure(f"{'-r' if recursive else '-0'} applies to PATH..., not to --import FOLDER")
        from .index_import import run_import

        run_import(db, imports, fmt)
        return
    if not paths:
        raise UsageFailure("give the images to index: PATH... (files, folders, globs, '-'), or --import FOLDER")
    started = time.perf_counter()
    try:
        inputs = expand_inputs(paths, recursive=recursive, stdin=stdin_for(paths), nul=nul)
        model, net, tag_id, feature_id, dim = load_networks(tag_weights, feature_weights, device, precision, backend)
        check_decode(decode, model)
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    lock = JobLock(db, make_job("index", "sqlite", {}, {"tag": tag_id, "feature": feature_id}))
    try:
        with Index(db, create=True) as idx:
            idx.check_models(tag_id, feature_id, dim)
            with progress_bar(len(inputs), progress, unit="file", desc="scan") as scan:
                bars: dict[str, Any] = {}

                def planned(plan: Plan) -> None:
                    scan.close()
                    for path, error in plan.missing:
                        report_failure(None, path, error)
                    bars["net"] = progress_bar(len(plan.todo), progress, desc="index")

                def batch(records: list[dict[str, Any]]) -> None:
                    bar = bars["net"]
                    bar.update(len(records))
                    for record in records:
                        if "error" in record:
                            report_failure(bar, record["path"], record["error"])

                try:
                    summary = update(idx, inputs, model=model, net=net, batch_size=batch_size,
                                     workers=default_workers(model) if workers is None else workers,
                                     on_file=lambda: scan.update(1), on_plan=planned, on_batch=batch,
                                     decode=decode)  # fmt: skip
                finally:
                    if "net" in bars:
                        bars["net"].close()
            lock.record("complete")
    finally:
        lock.release()
    if fmt == "json":
        click.echo(json.dumps(summary.counts()))
    counts = ", ".join(f"{v} {k}" for k, v in summary.counts().items())
    from ..inference import describe

    echo(None, f"i2v: {display(db)}: {counts} in {time.perf_counter() - started:.1f} s ({describe(net.tag_net)})")
    if summary.failed:
        sys.exit(EXIT_SOME_FAILED)
