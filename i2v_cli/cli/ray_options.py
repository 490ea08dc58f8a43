"""``--engine local|ray`` and the Ray options of ``i2v tag`` and ``i2v features``; Ray is imported only when asked."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from importlib.util import find_spec
from typing import Any

import click
from click.core import ParameterSource

from ..config import FEATURE
from ..store import model_identity
from .common import EXIT_SOME_FAILED, F, FiniteRange, UsageFailure, one_line, report_failure, stdin_for

NEEDS_EXTRA = "--engine ray needs Ray: pip install 'ray[data]' pyarrow (or, in the i2v checkout, pip install '.[ray]')"
_RAY_ONLY = ("ray_address", "num_workers", "gpus_per_worker", "shard_size", "ray_transfer")


def engine_options(f: F) -> F:
    """--engine, --ray-address, --num-workers, --gpus-per-worker, --shard-size and --ray-transfer."""
    options = [
        click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="local: this machine; ray: a Ray cluster, writing shards and a manifest into the -o folder."),
        click.option("--ray-address", metavar="ADDR",
                     help="[ray] Cluster to join (host:port). Default: $RAY_ADDRESS, a cluster started on this "
                     "machine with `ray start`, else a new local one."),
        click.option("--num-workers", type=click.IntRange(1), default=None,
                     help="[ray] Network actors. Default: one per GPU, else one per 4 CPUs."),
        click.option("--gpus-per-worker", type=FiniteRange(0), default=None,
                     help="[ray] GPUs per network actor. Default: 1 where the cluster has GPUs, else 0."),
        click.option("--shard-size", type=click.IntRange(1), default=None,
                     help="[ray] Images per output shard (and per decoding task). [default: 256]"),
        click.option("--ray-transfer", type=click.Choice(["float32", "uint8"]), default=None,
                     help="[ray] How decoded images travel to the network actors. float32: exact, the records "
                     "of a local run (602 KB an image). uint8: the resized image rounded to 0-255 (150 KB); "
                     "scores move by about 0.001, at most 0.02. [default: float32]"),
    ]  # fmt: skip
    for option in reversed(options):
        f = option(f)
    return f


def run_engine(kind: str) -> bool:
    """With ``--engine ray``, run the current command on Ray and return True; with the local engine, check that
    no Ray-only option was given and return False (the command then runs as usual)."""
    params = click.get_current_context().params
    if params["engine"] == "local":
        given = [f"--{name.replace('_', '-')}" for name in _RAY_ONLY if params.get(name) is not None]
        if params.get("fmt") == "parquet":
            given.append("--format parquet")
        if given:
            raise UsageFailure(f"{', '.join(given)}: for --engine ray only")
        return False
    if params.get("decode", "cpu") != "cpu":
        raise UsageFailure("--decode cuda: for the local engine only (Ray's actors decode on their CPUs)")
    if find_spec("ray") is None:
        raise UsageFailure(NEEDS_EXTRA)
    _run(kind, params)
    return True


def _job_settings(kind: str, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The shard format and the job's fields particular to ``kind``."""
    from ..tags import Selection, load_tag_list

    if kind == FEATURE:
        if params["fmt"] not in (None, "npy"):
            raise UsageFailure("--engine ray writes features as .npy shards: leave out --format, or use --format npy")
        return "npy", {"binary": params["binary"], "options": {"binary": params["binary"]}}
    if params.get("captions") or params.get("captions_dir"):
        raise UsageFailure("--captions works with --engine local only")
    if params["fmt"] == "json":
        raise UsageFailure("--engine ray writes --format jsonl, csv or parquet shards, not one JSON list")
    selection = Selection.make(
        params["threshold"],
        general=params["general_threshold"],
        character=params["character_threshold"],
        copyright=params["copyright_threshold"],
        top_k=params["top_k"],
    )
    tags = load_tag_list(params["tag_list"])
    from ..captions import tag_key

    keys = {tag_key(t.strip()) for spec in params["exclude"] for t in spec.split(",") if t.strip()}
    exclude = frozenset(t for t in tags if tag_key(t) in keys)
    digest = "sha256:" + hashlib.sha256(json.dumps(tags, ensure_ascii=False).encode()).hexdigest()
    options = {"thresholds": dict(selection.thresholds), "top_k": selection.top_k, "tag_list": digest,
               "exclude": sorted(exclude)}  # fmt: skip
    fmt = params["fmt"] or "jsonl"
    return fmt, {"tags": tags, "selection": selection, "exclude": exclude, "options": options}


def _check_local_options(params: dict[str, Any]) -> str:
    """Refuse the local options that Ray cannot honour, before anything starts; return the actors' device."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("workers") is ParameterSource.COMMANDLINE:
        raise UsageFailure(
            "--workers: with --engine ray, decoding runs in Ray tasks; use --shard-size and --num-workers"
        )
    device = params["device"]
    if device not in ("auto", "cpu", "cuda"):
        raise UsageFailure(f"--device {device}: with --engine ray, Ray gives each actor its GPU; use --device cuda")
    if device == "cpu" and params["gpus_per_worker"]:
        raise UsageFailure("--device cpu contradicts --gpus-per-worker")
    actors = "cuda" if device == "cuda" or params["gpus_per_worker"] else "cpu"
    if device == "auto" and not params["gpus_per_worker"]:
        actors = "cpu"  # decided once Ray tells what the cluster has; checked again there
    import torch

    from ..errors import I2VError
    from ..inference import resolve_backend

    try:
        resolve_backend(params["backend"], torch.device(actors), params["precision"])
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    return device


def _run(kind: str, params: dict[str, Any]) -> None:
    from ..ray_engine import DEFAULT_SHARD_SIZE, RayJob, expand_ray_inputs, run_job
    from ..weights import load_weights, resolve_weights

    out = params["output"]
    if not out:
        raise UsageFailure("--engine ray writes shards into a folder: give -o FOLDER")
    device = _check_local_options(params)
    fmt, settings = _job_settings(kind, params)
    paths = params["paths"]
    stdin = stdin_for(paths)
    inputs = expand_ray_inputs(paths, recursive=params["recursive"], stdin=stdin, nul=params["nul"])
    weights = resolve_weights(params["weights"], kind).absolute()
    _, info = load_weights(weights, kind)  # a model of the other kind is a one-line ModelKindError
    gpus = params["gpus_per_worker"]
    job = RayJob(
        kind=kind,
        weights=str(weights),
        out=out,
        fmt=fmt,
        batch_size=params["batch_size"],
        precision=params["precision"],
        backend=params["backend"],
        shard_size=params["shard_size"] or DEFAULT_SHARD_SIZE,
        num_workers=params["num_workers"],
        gpus_per_worker=0.0
        if gpus is None and device == "cpu"
        else (1.0 if gpus is None and device == "cuda" else gpus),
        require_gpus=device == "cuda",
        address=params["ray_address"],
        resume=params["resume"],
        transfer=params["ray_transfer"] or "float32",
        progress=sys.stderr.isatty() if params["progress"] is None else params["progress"],
        **settings,
    )
    reported = 0
    summary = None
    for summary in run_job(job, inputs, model_identity(info)):
        for path, error in summary.errors[reported:]:
            report_failure(None, path, error)
        reported = len(summary.errors)
    assert summary is not None
    skipped = f"; {summary.skipped} skipped (already in {out})" if summary.skipped else ""
    click.echo(
        one_line(
            f"i2v: ray: {summary.images} images, {len(summary.errors)} failed, in {summary.seconds:.1f} s "
            f"({summary.throughput:.1f} images/s, {summary.workers} workers x {summary.gpus_per_worker:g} GPU)"
            f"{skipped}; shards and manifest.json in {os.path.join(out, '')}"
        ),
        err=True,
    )
    if summary.errors:
        sys.exit(EXIT_SOME_FAILED)
