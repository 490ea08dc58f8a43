"""``i2v similar``: the indexed images closest to each query, by exact search over a feature file."""

from __future__ import annotations

import io
import os
import sys
from typing import Any

import click
import numpy as np

from ..config import FEATURE
from ..errors import I2VError
from ..features import FeatureFile, binarize, read_features
from ..inputs import expand_inputs
from ..resume import claim_output, make_job
from ..store import how_weights_differ, model_identity, same_weights
from ..writers import Writer, check_output, display, format_for, one_line, open_writer
from .common import (
    CONTEXT_SETTINGS,
    EXIT_SOME_FAILED,
    UsageFailure,
    default_workers,
    echo,
    model_options,
    report_failure,
    stdin_for,
)

SIMILAR_FORMATS = ("text", "json", "jsonl")


class TextWriter(Writer):
    """For people: the query on a line, then one ``score  path`` line per result (``cosine`` similarity or
    ``hamming`` distance, said in the query's line), a blank line between queries. Paths are shown as they
    open from the current folder."""

    def __init__(
        self, path: str | None = None, *, keep: int | None = None, base: str = ".", binary: bool = False
    ) -> None:
        self.base = base
        self.measure = "hamming distance" if binary else "cosine similarity"  # the index's, even with no result
        super().__init__(path, keep=keep)

    def _format(self, record: dict[str, Any], buf: io.StringIO) -> None:
        if "error" in record:
            return  # reported on stderr
        hits = record["results"]
        buf.write(("" if self.count == 0 else "\n") + f"{one_line(record['query'])}: ({self.measure})\n")
        for hit in hits:
            score = f"{hit['distance']:5d}" if "distance" in hit else f"{hit['score']:.6f}"
            buf.write(f"  {score}  {one_line(_from_here(self.base, hit['path']))}\n")


def _from_here(base: str, path: str) -> str:
    """A stored path (relative to ``base``, the folder the features were written from) as it opens from here."""
    if os.path.isabs(path):
        return path
    return os.path.relpath(os.path.join(base, path))


def _query_paths(specs: tuple[str, ...], index: FeatureFile, recursive: bool, nul: bool) -> list[str]:
    """Each query as given when the index holds it; else expanded like `i2v tag`'s inputs (folders, globs, -)."""
    found: list[str] = []
    for spec in specs:
        if spec != "-" and index.row(spec) is not None:
            found.append(spec)
        else:
            stdin = stdin_for([spec])
            found.extend(expand_inputs([spec], recursive=recursive, stdin=stdin, nul=nul, keep_missing=True))
    return found


@click.command(context_settings=CONTEXT_SETTINGS)
@click.argument("queries", nargs=-1, required=True, metavar="QUERY...")
@click.option(
    "--index",
    "-i",
    "index_path",
    required=True,
    metavar="FILE",
    help="Features written by `i2v features -o FILE.npy` (the .npy or its .paths.jsonl).",
)
@click.option("--top-k", "-k", "k", type=click.IntRange(1), default=10, show_default=True, help="Results per query.")
@click.option(
    "--format",
    "-f",
    "fmt",
    type=click.Choice(SIMILAR_FORMATS),
    help="Output format. Default: from -o's extension (json, jsonl), else text.",
)
@click.option("--output", "-o", metavar="FILE", help="Write here instead of stdout.")
@click.option("--include-self", is_flag=True, help="Keep a query's own row among its results.")
@click.option("--recursive", "-r", is_flag=True, help="Look for query images in sub-folders too.")
@click.option("--null", "-0", "nul", is_flag=True, help="Paths read from '-' are NUL-separated.")
@model_options
def similar(
    queries: tuple[str, ...],
    index_path: str,
    k: int,
    fmt: str | None,
    output: str | None,
    include_self: bool,
    recursive: bool,
    nul: bool,
    weights: str | None,
    device: str,
    batch_size: int,
    workers: int | None,
    decode: str,
    precision: str,
    backend: str,
) -> None:
    """Find the indexed images most similar to each QUERY: a path stored in the index (its stored row is
    used, no model needed) or an image file (its feature is computed with the feature model).

    Float features are compared by cosine similarity (highest first), binary ones by Hamming distance
    (lowest first); the search is exact. A query's own row is left out of its results. JSON results give each
    path as the index stores it (a relative one is relative to the folder `i2v features` ran in); the
    text format shows it as it opens from the current folder.

    \b
    Examples:
      i2v features ./illustrations -o vecs.npy
      i2v similar ./illustrations/miku.png --index vecs.npy -k 5
      i2v similar new.jpg --index vecs.npy --format jsonl | jq -r '.results[].path'
    """
    # torch comes with these: imported here so that `i2v similar -h` answers at once.
    from ..runner import resolve_device, run_model
    from ..similar import result_record, search
    from ..weights import load_model, resolve_weights

    try:
        fmt = format_for(fmt, output, SIMILAR_FORMATS, "text")
        if device not in ("auto", "cpu") or decode != "cpu":  # checked even when no query needs the network
            from ..gpudecode import check_gpu_decoding  # brings torch: only for these

            check_gpu_decoding(decode, resolve_device(device))
        index = read_features(index_path)
        paths = _query_paths(queries, index, recursive, nul)
        # The queries are inputs too: as named here, and a stored one as it opens from the folder of the index.
        stored = [os.path.join(index.base, p) for p in paths if not os.path.isabs(p) and index.row(p) is not None]
        check_output(output, [str(index.vectors_path), str(index.paths_path), *paths, *stored])
    except I2VError as exc:
        raise UsageFailure(str(exc)) from None
    width = index.vectors.shape[1]
    vectors: dict[int, np.ndarray] = {}  # query position -> its vector
    own_rows: dict[int, int] = {}
    errors: dict[int, str] = {}
    to_compute: list[int] = []
    for i, path in enumerate(paths):
        row = index.row(path)
        if row is not None:
            own_rows[i] = row
            vectors[i] = np.array(index.vectors[row])
        elif os.path.exists(path):
            to_compute.append(i)
        else:
            errors[i] = f"not in the index {display(str(index.vectors_path))} and no such file"

    if to_compute:
        dev = resolve_device(device)
        model, info = load_model(resolve_weights(weights, FEATURE), kind=FEATURE, device=str(dev))
        if model.arch.feature_dim != index.dim:
            raise UsageFailure(
                f"{index.vectors_path} holds features of length {index.dim}, but the model {info.source} gives "
                f"{model.arch.feature_dim}: use the weights the index was made with"
            )
        made_with = index.model.get("sha256")
        if made_with and info.sha256 and not same_weights(index.model, model_identity(info)):
            click.echo(
                f"i2v: warning: {index.vectors_path} was made with {index.model.get('source')} "
                f"(sha256 {made_with[:12]}…), the query model is {info.source} (sha256 {info.sha256[:12]}…; "
                f"{how_weights_differ(index.model, model_identity(info))})",
                err=True,
            )
        image_paths = [paths[i] for i in to_compute]
        n_workers = (default_workers(model) if workers is None else workers) if len(image_paths) > batch_size else 0
        position = dict(zip(range(len(image_paths)), to_compute, strict=True))
        done = 0
        for batch in run_model(
            model,
            image_paths,
            batch_size=batch_size,
            workers=n_workers,
            precision=precision,
            backend=backend,
            decode=decode,
        ):
            for r in batch:
                i = position[done]
                done += 1
                if r.output is None:
                    errors[i] = r.error or "no output"
                else:
                    vectors[i] = binarize(r.output[None])[0] if index.binary else r.output
    for i, vector in vectors.items():
        if vector.shape != (width,):
            raise I2VError(f"query {paths[i]}: feature of shape {vector.shape}, the index has {width} columns")

    order = sorted(vectors)
    found = search(
        index.vectors,
        np.stack([vectors[i] for i in order]) if order else np.zeros((0, width), index.vectors.dtype),
        k,
        exclude=None if include_self else [own_rows.get(i) for i in order],
    )
    neighbors = dict(zip(order, found, strict=True))
    base = index.base
    with claim_output(output, make_job("similar", fmt, {}, {})):
        writer = TextWriter(output, base=base, binary=index.binary) if fmt == "text" else open_writer(fmt, output)
        with writer:
            for i, path in enumerate(paths):
                if i in errors:
                    report_failure(None, path, errors[i])
                    writer.write([{"query": path, "error": errors[i]}])
                else:
                    writer.write([result_record(path, own_rows.get(i), neighbors[i], index.paths, index.binary)])
    if errors:
        echo(None, f"i2v: {len(errors)} of {len(paths)} queries failed")
        sys.exit(EXIT_SOME_FAILED)
