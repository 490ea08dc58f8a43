"""The reader stage: decoding and preprocessing images in DataLoader workers, in input order, with a failure as a
per-image error, never a dead batch or a dead run.

The DataLoader is iterated in a reader thread of its own. That keeps decoding beside the network rather than in
its way, and it keeps torch's SIGCHLD handler (installed only when a loader starts in the main thread) from
raising a worker's death wherever the main thread happens to be: here a dead worker is noticed by the loader
itself, in the reader thread, which retries the batch in hand one image per process so that only the image
that kills its decoder fails.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .batches import Batch, Sample, decode_error, decode_sample, stack_samples
from .transform import load_and_preprocess
from .worker_context import worker_context

__all__ = [
    "Batch",
    "ImageDataset",
    "Sample",
    "collate",
    "decode_error",
    "decode_in_worker",
    "iter_batches",
    "merge_batches",
    "read_ahead",
]


class ImageDataset(Dataset[Sample]):
    """Paths to network inputs; never raises for a bad file, it returns a Sample with the error instead."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        return decode_sample(self.paths, index, load_and_preprocess)


def collate(samples: list[Sample]) -> Batch:
    """Stack the decoded inputs and set the errors aside. The stack travels from a worker as a NumPy array:
    plain bytes through the pipe, rather than a tensor in shared memory whose file descriptors are handed over by
    a server thread in the worker (which, cut off when the run is interrupted, prints a traceback)."""
    return stack_samples(samples)


def _init_worker(_: int) -> None:
    # Each worker preprocesses one image at a time; one thread each keeps workers from fighting over cores.
    torch.set_num_threads(1)


@contextlib.contextmanager
def _no_worker_advice() -> Iterator[None]:
    """torch's advice about worker counts (more workers than cores: the user asked for them) kept from the user's
    terminal; the loader gives it when made and when iterated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*worker processes in total.*", category=UserWarning)
        yield


def _quiet_loader(loader: DataLoader[Sample]) -> Iterator[Batch]:
    """Iterate a loader without its advice about worker counts reaching the user's terminal."""
    with _no_worker_advice():
        it = iter(loader)
    for batch in it:
        batch.inputs = torch.as_tensor(batch.inputs)  # a NumPy array from a worker (see collate)
        yield batch


def make_loader(
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    workers: int = 0,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
    chunk: int | None = None,
) -> DataLoader[Sample]:
    """An ordered DataLoader over ``paths`` (or over the positions ``indices`` of it) whose batches are
    :class:`Batch` objects: network batches of ``batch_size``, or with ``chunk`` the parts of them that each
    worker decodes (:func:`decoding_jobs`), to be joined again by :func:`merge_batches`."""
    order = range(len(paths)) if indices is None else indices
    jobs = decoding_jobs(order, batch_size, chunk) if chunk is not None and chunk < batch_size else None
    with _no_worker_advice():  # torch gives it when the loader is made, too
        return DataLoader(
            ImageDataset(paths),
            batch_size=1 if jobs is not None else batch_size,
            sampler=None if jobs is not None else order,
            batch_sampler=jobs,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            worker_init_fn=_init_worker if workers > 0 else None,
            prefetch_factor=4 if workers > 0 else None,
            multiprocessing_context=worker_context() if workers > 0 else None,  # see worker_context.py
        )


#: The fewest images in a decoding job when a network batch is shared among workers: each job is a round trip
#: through the loader's queues and pipes.
MIN_CHUNK = 4


def chunk_size(batch_size: int, workers: int) -> int:
    """Images per decoding job: a network batch shared among the workers. With a whole batch per job, a batch of
    256 was decoded by one worker while the others waited for batches of their own (on a 16-core GPU machine,
    14 workers tagged no faster than 4)."""
    if workers <= 1:
        return batch_size
    return min(batch_size, max(MIN_CHUNK, -(-batch_size // workers)))


def decoding_jobs(indices: Sequence[int], batch_size: int, chunk: int | None) -> list[list[int]]:
    """``indices`` cut into network batches of ``batch_size``, and each of those into jobs of at most ``chunk``
    images: a job never spans two network batches."""
    step = chunk or batch_size
    jobs = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        jobs.extend(list(batch[i : i + step]) for i in range(0, len(batch), step))
    return jobs


def merge_batches(parts: Sequence[Batch]) -> Batch:
    """The parts of one network batch, in input order, as one batch: inputs concatenated, errors together."""
    if len(parts) == 1:
        return parts[0]
    inputs = [torch.as_tensor(part.inputs) for part in parts if part.ok]
    ok = [i for part in parts for i in part.ok]
    errors = {i: error for part in parts for i, error in part.errors.items()}
    return Batch(ok, torch.cat(inputs) if inputs else torch.empty(0), errors)


@contextlib.contextmanager
def _sigchld_as_it_was() -> Iterator[None]:
    """A loader iterated in the main thread: SIGCHLD's handler put back as it was afterwards. torch installs its
    own the first time, for good, and from then on any later loader's dead worker (a reader thread's, in the same
    process) raised in the main thread wherever it was, instead of costing only its image."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGCHLD"):
        yield
        return
    previous = signal.getsignal(signal.SIGCHLD)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)


def worker_died(exc: RuntimeError) -> bool:
    """Whether a DataLoader's error says one of its worker processes died (rather than a bug of ours)."""
    return "DataLoader worker" in str(exc)


def decode_isolated(paths: Sequence[str], indices: Sequence[int]) -> Batch:
    """Decode each of ``paths[indices]`` in a process of its own, so that an image that kills its decoder (a
    crash in a native library, the out-of-memory killer) gets an error and the others are unaffected."""
    ok: list[int] = []
    inputs: list[torch.Tensor] = []
    errors: dict[int, str] = {}
    for i in indices:
        try:
            with _sigchld_as_it_was():
                (batch,) = list(_quiet_loader(make_loader(paths, batch_size=1, workers=1, indices=[i])))
        except RuntimeError as exc:
            if not worker_died(exc):
                raise
            errors[i] = f"{os.fsdecode(paths[i])}: the image decoder crashed on this file (its worker process died)"
            continue
        if batch.ok:
            ok.append(i)
            inputs.append(batch.inputs[0])
        errors.update(batch.errors)
    return Batch(ok, torch.stack(inputs) if inputs else torch.empty(0), errors)


def decode_in_worker(paths: Sequence[str]) -> Batch:
    """All of ``paths`` decoded in one worker process, as one batch; should the worker die, each image is
    retried in a process of its own (:func:`decode_isolated`). For callers that must survive any image, such
    as a Ray task, whose own death would fail its whole shard."""
    if not paths:
        return Batch([], torch.empty(0), {})
    try:
        with _sigchld_as_it_was():
            (batch,) = list(_quiet_loader(make_loader(paths, batch_size=len(paths), workers=1)))
    except RuntimeError as exc:
        if not worker_died(exc):
            raise
        return decode_isolated(paths, range(len(paths)))
    return batch


class _Failed:
    """The reader thread's exception, handed to the consumer to raise (a bug, not a bad image)."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


def read_ahead(produce: Callable[[threading.Event], Iterator[Batch]], depth: int = 2) -> Iterator[Batch]:
    """``produce``'s batches, made in a reader thread of their own up to ``depth`` ahead of the consumer: the
    reader stage beside the network, not in its way. ``produce`` gets an event that is set when the consumer
    stops (closed, Ctrl-C); an exception in it is raised in the consumer, nothing is swallowed."""
    handoff: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read() -> None:
        try:
            batches = produce(stop)
            try:
                for batch in batches:
                    put(batch)
                    if stop.is_set():
                        return
            finally:
                batches.close()  # type: ignore[attr-defined]
            put(_END)
        except BaseException as exc:  # handed over and raised in the consumer
            put(_Failed(exc))

    reader = threading.Thread(target=read, name="i2v-reader", daemon=True)
    reader.start()
    try:
        while True:
            try:
                item = handoff.get(timeout=0.2)
            except queue.Empty:
                if not reader.is_alive():
                    raise RuntimeError("the image reader thread ended without a word") from None
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        reader.join(timeout=2)


def iter_batches(
    paths: Sequence[str], *, batch_size: int = 16, workers: int = 0, pin_memory: bool = False
) -> Iterator[Batch]:
    """Decoded batches of ``paths`` in input order, produced by a reader thread a couple of batches ahead
    (:func:`read_ahead`).

    A decoding worker that dies (a decoder crash, the out-of-memory killer) costs only the image that killed
    it: the parts of the batch in hand that arrived are kept, the rest is decoded again one image per process
    (:func:`decode_isolated`), and a new loader goes on from the next batch. Closing the iterator (the consumer
    stopped, Ctrl-C) stops the reader.
    """
    chunk = chunk_size(batch_size, workers)  # each worker decodes a part of every network batch
    split = chunk < batch_size
    workers = min(workers, len(decoding_jobs(range(len(paths)), batch_size, chunk)))  # none started to idle

    def produce(stop: threading.Event) -> Iterator[Batch]:
        if workers == 0:
            # Decoding here, beside the network: one thread, as in a worker. torch's setting is per thread (its
            # OpenMP and MKL counts), so the network's threads are left as they are; without it each resize
            # woke the other core's OpenMP thread, whose spinning doubled the CPU time of a run (measured).
            torch.set_num_threads(1)
        done = 0
        while done < len(paths) and not stop.is_set():
            loader = make_loader(
                paths,
                batch_size=batch_size,
                workers=workers,
                pin_memory=pin_memory and not split,  # the joined batch is pinned instead, once
                indices=range(done, len(paths)),
                chunk=chunk if split else None,
            )
            batches = _quiet_loader(loader)
            parts: list[Batch] = []
            try:
                for part in batches:
                    parts.append(part)
                    if sum(p.size for p in parts) < min(batch_size, len(paths) - done):
                        continue  # more parts of this network batch to come
                    batch = merge_batches(parts)
                    parts = []
                    if split and pin_memory and batch.ok:
                        batch.pin_memory()
                    done += batch.size
                    yield batch
                    if stop.is_set():
                        return
            except RuntimeError as exc:
                if workers == 0 or not worker_died(exc):
                    raise
                batches.close()
                # The parts of this network batch that arrived whole are kept; the rest is decoded again, one
                # image per process, so that only the image that killed its worker fails.
                covered = sum(p.size for p in parts)
                rest = decode_isolated(paths, range(done + covered, min(done + batch_size, len(paths))))
                batch = merge_batches([*parts, rest])
                done += batch.size
                yield batch
            finally:
                batches.close()

    return read_ahead(produce)
