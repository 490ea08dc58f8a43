"""Wiring of one run: paths -> reader -> network -> per-image results, in input order, batch by batch.

Two readers, one mapper: the DataLoader's (:func:`i2v_cli.data.iter_batches`) for a torch network, and for a
predictor of NumPy arrays (``arrays = True``: :class:`i2v_cli.ortcache.SessionNet`) the plain one of
:func:`i2v_cli.batches.read_batches`, so that such a run never imports torch (about 1 CPU-second of a one-image
run). Importing this module does not import torch either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .batches import Batch, read_batches
from .errors import I2VError

if TYPE_CHECKING:
    import torch

    from .inference import Predictor
    from .model import Illust2VecNet


@dataclass
class Result:
    """The network's output for one input path (tag probabilities or a feature), or the error that stopped it."""

    path: str
    output: np.ndarray | None
    error: str | None = None


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise I2VError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise I2VError(f"device {spec} asked for, but CUDA is not available here: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise I2VError(f"device {spec} does not exist: {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise I2VError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def run_model(
    model: Illust2VecNet | None,
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    workers: int = 0,
    on_progress: Callable[[int], None] | None = None,
    precision: str = "fp32",
    backend: str = "auto",
    net: Predictor | None = None,
    decode: str = "cpu",
) -> Iterator[list[Result]]:
    """Run ``model`` over ``paths``; yield each batch's results in input order as soon as it is done.

    The reader stage (:func:`i2v_cli.data.iter_batches`) decodes ahead in its own thread; images that fail get
    a Result with an error and no output, the others are unaffected, even when an image kills its decoding
    process. ``precision`` (fp32, bf16, fp16) and ``backend`` (auto, torch, onnxruntime) choose how the network
    runs (see :func:`i2v_cli.inference.prepare_for_inference`); ``net`` is a network prepared already, and then
    ``model`` may be None (a CPU session on a cached export, the weights never loaded). ``decode="cuda"``
    decodes JPEG files with nvJPEG on the model's GPU (:mod:`i2v_cli.gpudecode`). A ``net`` of NumPy
    arrays (``net.arrays``) gets its batches from :func:`i2v_cli.batches.read_batches`, without torch (decoded in
    a child process when ``workers`` > 0, in this thread with 0).
    """
    if model is None and net is None:
        raise ValueError("run_model needs a model, a prepared net, or both")
    if decode not in ("cpu", "cuda"):
        raise I2VError(f"unknown decode {decode!r}: use 'cpu' or 'cuda'")
    if getattr(net, "arrays", False):
        if decode != "cpu":  # a session of NumPy arrays runs on the CPU: there is no GPU to decode on
            raise I2VError(f"decode={decode!r} needs the network on a CUDA device; this one runs on the CPU")
        yield from _run_arrays(net, paths, batch_size=batch_size, isolate=workers > 0, on_progress=on_progress)
        return
    import torch

    from .data import iter_batches
    from .inference import model_device, prepare_for_inference

    device = model_device(model) if model is not None else torch.device("cpu")
    if net is None:
        assert model is not None
        net = prepare_for_inference(model, precision=precision, backend=backend)
    if decode == "cuda":
        from .gpudecode import check_gpu_decoding, gpu_batches

        check_gpu_decoding(decode, device)
        batches = gpu_batches(paths, batch_size=batch_size, device=device, workers=workers)
    else:
        batches = iter_batches(paths, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    try:
        for batch in batches:
            results = map_batch(net, paths, batch, device)
            yield results
            if on_progress is not None:
                on_progress(len(results))
    finally:
        batches.close()


def _run_arrays(
    net: Any, paths: Sequence[str], *, batch_size: int, isolate: bool, on_progress: Callable[[int], None] | None
) -> Iterator[list[Result]]:
    """:func:`run_model` for a predictor of NumPy arrays: batches decoded in this thread (or, with ``isolate``, in
    a child process per batch), the same mapper, no torch."""
    for batch in read_batches(paths, batch_size=batch_size, isolate=isolate):
        results = map_batch(net, paths, batch, None)
        yield results
        if on_progress is not None:
            on_progress(len(results))


def map_batch(
    net: Predictor, paths: Sequence[str], batch: Batch, device: torch.device | None, batch_size: int | None = None
) -> list[Result]:
    """The mapper: network outputs for a batch's decoded images (``batch_size`` at a time), merged in order with
    the errors of the others (:func:`merge_outputs`)."""
    return merge_outputs(paths, batch, predict(net, batch.inputs, device, batch_size) if batch.ok else None)


def predict(net: Any, inputs: Any, device: torch.device | None, batch_size: int | None = None) -> np.ndarray:
    """``net``'s float32 (N, out) outputs, ``batch_size`` inputs at a time (all at once when None): a predictor of
    NumPy arrays (``net.arrays``) is called as it is, without torch; others through
    :func:`i2v_cli.inference.predict` on ``device``."""
    if getattr(net, "arrays", False):
        step = batch_size or max(len(inputs), 1)
        return np.concatenate([net(inputs[i : i + step]) for i in range(0, len(inputs), step)])
    from .inference import predict as predict_tensors

    assert device is not None
    return predict_tensors(net, inputs, device, batch_size)


def merge_outputs(paths: Sequence[str], batch: Batch, outputs: np.ndarray | None) -> list[Result]:
    """A batch's results in input order: ``outputs`` (one row per decoded image, in ``batch.ok`` order) and the
    errors of the others. An output that is not finite (NaN, infinity: broken weights) is that image's error,
    never a written NaN."""
    by_index = dict(zip(batch.ok, outputs, strict=True)) if outputs is not None else {}
    results = []
    for i in sorted([*batch.ok, *batch.errors]):
        out = by_index.get(i)
        if out is not None and not np.isfinite(out).all():
            results.append(Result(paths[i], None, f"{paths[i]}: the network's output is not finite (NaN or "
                                  "infinity): the weights are broken"))  # fmt: skip
        else:
            results.append(Result(paths[i], out, batch.errors.get(i)))
    return results
