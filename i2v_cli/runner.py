"""Wiring of one run: paths -> DataLoader -> network -> per-image results, in input order, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import Batch, decode_isolated, make_loader, worker_died
from .errors import I2VError
from .inference import Predictor, model_device, predict, prepare_for_inference
from .model import Illust2VecNet


@dataclass
class Result:
    """The network's output for one input path (tag probabilities or a feature), or the error that stopped it."""

    path: str
    output: np.ndarray | None
    error: str | None = None


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` as given."""
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
    model: Illust2VecNet,
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    workers: int = 0,
    on_progress: Callable[[int], None] | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> Iterator[list[Result]]:
    """Run ``model`` over ``paths``; yield each batch's results in input order as soon as it is done.

    Images that fail to decode get a Result with an error and no output; the others are unaffected. If a
    decoding worker dies (a decoder crash, the out-of-memory killer), the batch in hand is retried one image
    per process, the image that kills its process gets an error, and the run goes on.

    ``precision`` (fp32, bf16, fp16) and ``backend`` (auto, torch, onnxruntime) choose how the network runs:
    see :func:`i2v_cli.inference.prepare_for_inference`.
    """
    device = model_device(model)
    net = prepare_for_inference(model, precision=precision, backend=backend)
    pin = device.type == "cuda"
    done = 0
    while done < len(paths):
        loader = make_loader(
            paths, batch_size=batch_size, workers=workers, pin_memory=pin, indices=range(done, len(paths))
        )
        try:
            for batch in loader:
                results = _infer(net, paths, batch, device)
                done += len(results)
                yield results
                if on_progress is not None:
                    on_progress(len(results))
        except RuntimeError as exc:
            if workers == 0 or not worker_died(exc):
                raise
            del loader
            # Each image of the batch in hand in a process of its own: the one that kills its decoder is told apart.
            isolated = decode_isolated(paths, range(done, min(done + batch_size, len(paths))))
            results = _infer(net, paths, isolated, device)
            done += len(results)
            yield results
            if on_progress is not None:
                on_progress(len(results))


def _infer(model: Predictor, paths: Sequence[str], batch: Batch, device: torch.device) -> list[Result]:
    """Network outputs for a batch's decoded images, merged in order with the errors of the others."""
    outputs = dict(zip(batch.ok, predict(model, batch.inputs, device), strict=True)) if batch.ok else {}
    return [Result(paths[i], outputs.get(i), batch.errors.get(i)) for i in sorted([*batch.ok, *batch.errors])]
