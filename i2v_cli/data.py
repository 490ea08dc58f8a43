"""Decoding and preprocessing images in DataLoader workers, with a failure as a per-image error, not a dead batch."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import I2VError
from .transform import load_and_preprocess


@dataclass
class Sample:
    """One decoded input: its position in the run, and either the network input or why there is none."""

    index: int
    tensor: torch.Tensor | None
    error: str | None


@dataclass
class Batch:
    """A batch as the network sees it: the stacked inputs of the images that decoded, and the errors of
    those that did not, each keyed by its position in the run."""

    ok: list[int]
    inputs: torch.Tensor
    errors: dict[int, str]

    def pin_memory(self) -> Batch:
        """Let DataLoader(pin_memory=True) pin the input tensor for fast, non-blocking copies to a GPU."""
        self.inputs = self.inputs.pin_memory()
        return self


def decode_error(path: str, exc: BaseException) -> str:
    """The message recorded for an image that could not be decoded; it names the file."""
    if isinstance(exc, I2VError):
        return str(exc)
    return f"{path}: cannot read image: {type(exc).__name__}: {exc}"


class ImageDataset(Dataset[Sample]):
    """Paths to network inputs; never raises for a bad file, it returns a Sample with the error instead."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        try:
            return Sample(index, load_and_preprocess(self.paths[index]), None)
        except Exception as exc:  # any failure of one file is that file's record, never the run's end
            return Sample(index, None, decode_error(self.paths[index], exc))


def collate(samples: list[Sample]) -> Batch:
    """Stack the decoded inputs and set the errors aside."""
    ok = [s for s in samples if s.tensor is not None]
    inputs = torch.stack([s.tensor for s in ok]) if ok else torch.empty(0)
    return Batch([s.index for s in ok], inputs, {s.index: s.error or "" for s in samples if s.tensor is None})


def _init_worker(_: int) -> None:
    # Each worker preprocesses one image at a time; one thread each keeps workers from fighting over cores.
    torch.set_num_threads(1)


def make_loader(
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    workers: int = 0,
    pin_memory: bool = False,
    indices: Sequence[int] | None = None,
) -> DataLoader[Sample]:
    """An ordered DataLoader over ``paths`` (or over the positions ``indices`` of it) whose batches are
    :class:`Batch` objects."""
    return DataLoader(
        ImageDataset(paths),
        batch_size=batch_size,
        sampler=range(len(paths)) if indices is None else indices,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,
    )


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
            (batch,) = list(make_loader(paths, batch_size=1, workers=1, indices=[i]))
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
        (batch,) = list(make_loader(paths, batch_size=len(paths), workers=1))
    except RuntimeError as exc:
        if not worker_died(exc):
            raise
        return decode_isolated(paths, range(len(paths)))
    return batch
