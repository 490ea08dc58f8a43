"""One job, one way: paths -> decode (reader) -> network (mapper) -> records -> sink.

The stages and the modules that own them:

- inputs: :mod:`i2v_cli.inputs` turns command-line inputs into the ordered list of paths.
- reader: :func:`i2v_cli.data.iter_batches` decodes and preprocesses in DataLoader workers, in a thread;
  :func:`i2v_cli.batches.read_batches` in the calling thread, without torch, for a run of one batch on an ONNX
  Runtime session (:func:`i2v_cli.runner.run_model` picks by the predictor).
- mapper: :func:`i2v_cli.runner.map_batch` runs the network prepared by :mod:`i2v_cli.inference`.
- records: :class:`TagRecords` and :class:`FeatureRecords` here turn outputs into records.
- sinks: :mod:`i2v_cli.writers` (JSON, JSONL, CSV), :mod:`i2v_cli.features` (vectors files, feature JSONL),
  :class:`CaptionSink` (caption files), :class:`i2v_cli.writers.Tee` for several at once.

:func:`run_job` wires them for the CLI's local engine; the Ray engine runs the same mapper, records and sinks
per shard, and the Python API the same mapper. Nothing here prints: progress and failures reach the caller
through ``on_batch``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .captions import CaptionOptions, write_caption
from .errors import CaptionError
from .features import binarize
from .runner import Result, run_model
from .tags import Selection, tag_record
from .writers import Record, Sink

if TYPE_CHECKING:  # torch comes with them; a run on a predictor of NumPy arrays never imports it
    from .inference import Predictor
    from .model import Illust2VecNet

RecordMaker = Callable[[Sequence[Result]], list[Record]]


@dataclass(frozen=True)
class TagRecords:
    """Tag records (:func:`i2v_cli.tags.tag_record`) of a batch's results; ``exclude`` tags are left out."""

    tags: Sequence[str]
    selection: Selection
    exclude: frozenset[str] = frozenset()

    def __call__(self, results: Sequence[Result]) -> list[Record]:
        records = [tag_record(r.path, r.output, r.error, self.tags, self.selection) for r in results]
        if self.exclude:
            for record in records:
                for category, scores in record.items():
                    if isinstance(scores, dict) and category != "rating":
                        record[category] = {t: s for t, s in scores.items() if t not in self.exclude}
        return records


@dataclass(frozen=True)
class FeatureRecords:
    """``{"path", "feature"}`` records of a batch's results (float32 rows, or packed bits with ``binary``)."""

    binary: bool = False

    def __call__(self, results: Sequence[Result]) -> list[Record]:
        ok = [r for r in results if r.output is not None]
        rows: Iterable[np.ndarray] = iter(())
        if ok:
            vectors = np.stack([r.output for r in ok])  # type: ignore[misc]
            rows = iter(binarize(vectors) if self.binary else vectors)
        return [
            {"path": r.path, "feature": next(rows)} if r.output is not None
            else {"path": r.path, "error": r.error or "no output"}
            for r in results
        ]  # fmt: skip


class CaptionSink(Sink):
    """A caption file per tag record (:func:`i2v_cli.captions.write_caption`); counts what happened to each,
    and keeps the failures (``errors``: path, message) for the caller to report. A WriteError (a full disk) is
    not one image's failure: it is raised, and the run stops there. Put it before the records' sink in a
    :class:`~i2v_cli.writers.Tee`, so that a record is written only once its caption is."""

    def __init__(self, options: CaptionOptions) -> None:
        self.options = options
        self.outcomes: Counter[str] = Counter()
        self.errors: list[tuple[str, str]] = []

    def write(self, records: Iterable[Record]) -> None:
        for record in records:
            if "error" in record:
                continue
            try:
                self.outcomes[write_caption(record, self.options)] += 1
            except CaptionError as exc:
                self.errors.append((record["path"], str(exc)))

    def close(self) -> None:
        """Caption files are each complete when written: nothing to finish."""

    def abort(self) -> None:
        """Caption files are each complete when written: nothing to undo."""


@dataclass
class Summary:
    """What a job did: inputs processed, and those that failed (path, error)."""

    processed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def run_job(
    model: Illust2VecNet | None,
    paths: Sequence[str],
    *,
    records: RecordMaker,
    sink: Sink,
    batch_size: int = 16,
    workers: int = 0,
    precision: str = "fp32",
    backend: str = "auto",
    net: Predictor | None = None,
    on_batch: Callable[[list[Record]], Any] | None = None,
    decode: str = "cpu",
) -> Summary:
    """Run one job: every path through the network into ``sink``, batch by batch, in input order.

    ``sink`` is closed when the job ends, on an interruption too (Ctrl-C, SIGTERM: what was done is kept), and
    aborted on any other exception. ``on_batch`` sees each batch's records after they were written. ``model``
    may be None when ``net`` is given, and ``decode`` says where JPEG files are decoded (see
    :func:`i2v_cli.runner.run_model`).
    """
    summary = Summary()
    with sink:
        for results in run_model(
            model,
            paths,
            batch_size=batch_size,
            workers=workers,
            precision=precision,
            backend=backend,
            net=net,
            decode=decode,
        ):
            batch = records(results)
            sink.write(batch)
            summary.processed += len(batch)
            summary.failures.extend((r["path"], r["error"]) for r in batch if "error" in r)
            if on_batch is not None:
                on_batch(batch)
    return summary
