"""Wiring of one run: paths -> DataLoader -> network -> per-image results, in input order, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import make_loader
from .errors import I2VError
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
) -> Iterator[list[Result]]:
    """Run ``model`` over ``paths``; yield each batch's results in input order as soon as it is done.

    Images that fail to decode get a Result with an error and no output; the others are unaffected.
    """
    device = next(model.parameters()).device
    loader = make_loader(paths, batch_size=batch_size, workers=workers, pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for batch in loader:
            outputs: dict[int, np.ndarray] = {}
            if batch.ok:
                x = batch.inputs.to(device, non_blocking=True)
                y = model(x).float().cpu().numpy()
                outputs = dict(zip(batch.ok, y, strict=True))
            indices = sorted([*batch.ok, *batch.errors])
            yield [Result(paths[i], outputs.get(i), batch.errors.get(i)) for i in indices]
            if on_progress is not None:
                on_progress(len(indices))
