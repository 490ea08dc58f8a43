"""Batches of decoded images, without torch: what the reader stage hands the network, and the reader of a run
that needs no torch at all (an ONNX Runtime session on a cached export, see :mod:`i2v_cli.runner`).

:mod:`i2v_cli.data` builds the same :class:`Batch` objects in DataLoader workers; both decode each image with
:func:`i2v_cli.transform.load_network_input` (there through its tensor wrapper), so a batch holds the same
float32 values whichever reader made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import I2VError

if TYPE_CHECKING:
    import torch

    from .decode import PathType


@dataclass
class Sample:
    """One decoded input: its position in the run, and either the network input or why there is none."""

    index: int
    tensor: torch.Tensor | np.ndarray | None
    error: str | None


@dataclass
class Batch:
    """A batch as the network sees it: the stacked inputs of the images that decoded (a tensor from the
    DataLoader, a NumPy array from :func:`read_batches`), and the errors of those that did not, each keyed by
    its position in the run."""

    ok: list[int]
    inputs: Any
    errors: dict[int, str]

    def pin_memory(self) -> Batch:
        """Let DataLoader(pin_memory=True) pin the input tensor for fast, non-blocking copies to a GPU."""
        import torch

        self.inputs = torch.as_tensor(self.inputs).pin_memory()
        return self


def decode_error(path: str, exc: BaseException) -> str:
    """The message recorded for an image that could not be decoded; it names the file."""
    if isinstance(exc, I2VError):
        return str(exc)
    return f"{path}: cannot read image: {type(exc).__name__}: {exc}"


def decode_sample(paths: Sequence[str], index: int, load: Callable[[PathType], Any]) -> Sample:
    """``load(paths[index])`` as a Sample; a bad file gives the Sample its error (decoding turns every failure of
    a bad file into an I2VError; bugs stay bugs)."""
    try:
        return Sample(index, load(paths[index]), None)
    except I2VError as exc:
        return Sample(index, None, decode_error(paths[index], exc))


def stack_samples(samples: Sequence[Sample]) -> Batch:
    """The decoded inputs stacked into one float32 NumPy array (N, 3, S, S); the errors set aside."""
    ok = [s for s in samples if s.tensor is not None]
    inputs = np.stack([np.asarray(s.tensor) for s in ok]) if ok else np.empty((0,), np.float32)
    return Batch([s.index for s in ok], inputs, {s.index: s.error or "" for s in samples if s.tensor is None})


def read_batches(paths: Sequence[str], *, batch_size: int = 16) -> Iterator[Batch]:
    """Batches of ``paths`` decoded one after another in the calling thread, in input order, without torch:
    the reader of a run that fits in one batch (see :func:`i2v_cli.runner.needs_torch`), where a reader thread
    or worker processes would have nothing to overlap."""
    from .transform import load_network_input

    for start in range(0, len(paths), batch_size):
        stop = min(len(paths), start + batch_size)
        yield stack_samples([decode_sample(paths, i, load_network_input) for i in range(start, stop)])
