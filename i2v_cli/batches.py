"""Batches of decoded images, without torch: what the reader stage hands the network, and the reader of a run
that needs no torch at all (an ONNX Runtime session on a cached export, see :mod:`i2v_cli.runner`).

:mod:`i2v_cli.data` builds the same :class:`Batch` objects in DataLoader workers; both decode each image with
:func:`i2v_cli.transform.load_network_input` (there through its tensor wrapper), so a batch holds the same
float32 values whichever reader made it.
"""

from __future__ import annotations

import os
import signal
import traceback
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

    @property
    def size(self) -> int:
        """How many images of the run the batch accounts for: decoded or failed."""
        return len(self.ok) + len(self.errors)

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


def read_batches(paths: Sequence[str], *, batch_size: int = 16, isolate: bool = False) -> Iterator[Batch]:
    """Batches of ``paths`` in input order, without torch: the reader of a run that fits in one batch (see
    :func:`i2v_cli.cli.common.runs_without_torch`), where a reader thread or several workers would have nothing
    to overlap. Decoded in the calling thread, or with ``isolate`` in a child process per batch, as a DataLoader
    worker does: an image that kills its decoder (a crash in a native library, the out-of-memory killer) then
    gets an error, and the others are decoded again, each in a process of its own."""
    for start in range(0, len(paths), batch_size):
        indices = range(start, min(len(paths), start + batch_size))
        yield stack_samples(_decode_isolated(paths, indices) if isolate else _decode_here(paths, indices))


def _decode_here(paths: Sequence[str], indices: Sequence[int]) -> list[Sample]:
    from .transform import load_network_input

    return [decode_sample(paths, i, load_network_input) for i in indices]


def _decode_isolated(paths: Sequence[str], indices: Sequence[int]) -> list[Sample]:
    """``indices`` decoded in a child process; should it die, each in a process of its own, and the one that
    kills its process gets the DataLoader's error for it."""
    samples = _decode_in_child(paths, indices)
    if samples is not None:
        return samples
    if len(indices) > 1:
        return [s for i in indices for s in _decode_isolated(paths, [i])]
    (i,) = indices
    error = f"{os.fsdecode(paths[i])}: the image decoder crashed on this file (its worker process died)"
    return [Sample(i, None, error)]


def _decode_in_child(paths: Sequence[str], indices: Sequence[int]) -> list[Sample] | None:
    """``indices`` decoded in a forked child (no torch, so it starts in milliseconds); None when it died before
    handing them over. A bug in it is raised here, with the child's traceback."""
    import multiprocessing

    from .worker_context import worker_context

    context = worker_context()  # the parent's garbage frozen around the fork (see worker_context)
    if context.get_start_method() != "fork":
        context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_child_main, args=(paths, list(indices), send, receive), name="i2v-decode", daemon=True
    )
    child.start()
    send.close()
    try:
        kind, value = receive.recv()
    except EOFError:  # the child died without a word
        kind, value = "died", None
    except BaseException:  # interrupted (Ctrl-C, SIGTERM) while it decodes: it is not needed any more
        child.kill()
        raise
    finally:
        receive.close()
        child.join()
    if kind == "died":
        return None
    if kind == "bug":
        raise RuntimeError(f"the image decoding process failed:\n{value}")
    return value


def _child_main(paths: Sequence[str], indices: list[int], send: Any, receive: Any) -> None:
    """The decoding child: its samples, or the traceback of a bug, through ``send``. Ctrl-C and SIGTERM are the
    parent's to handle (it kills this child when it stops waiting). The child closes its copy of the pipe's
    reading end (``receive``, inherited through the fork): with the parent gone (SIGKILL, the out-of-memory
    killer), sending then fails and the child leaves, instead of waiting for ever on a reader that is itself,
    holding the run's files (its output's lock) open."""
    receive.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    try:
        message: tuple[str, Any] = ("ok", _decode_here(paths, indices))
    except Exception:  # a bug: reported to the parent, which raises it
        message = ("bug", traceback.format_exc())
    try:
        send.send(message)
        send.close()
    except OSError:  # the parent is gone (BrokenPipeError): nobody is waiting for the batch
        pass
