"""Dynamic batching: images of concurrent requests gathered into network batches, run in one worker thread.

Each request hands over its decoded inputs (:meth:`Batcher.submit`) and waits on a future per image. The worker
thread takes the oldest waiting image's model (``tag`` or ``feature``), waits until ``max_batch`` images of that
model are waiting or the oldest has waited ``max_wait_ms``, and runs them through the pipeline's mapper
(:func:`i2v_cli.runner.map_batch`) as one batch. One thread owns the networks, so nothing else ever runs them at
the same time, and requests never block the event loop. Nothing here prints.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..data import Batch
from ..inference import Predictor
from ..runner import Result, map_batch


class BatcherClosed(RuntimeError):
    """The batcher was stopped: the image was not run (the server is shutting down)."""


@dataclass
class _Item:
    name: str
    tensor: torch.Tensor
    future: Future[Result]
    queued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """What the worker did: batches run, images run, and the largest batch (for /healthz and the bench)."""

    batches: int = 0
    images: int = 0
    largest: int = 0


class Batcher:
    """One worker thread running ``nets`` (model name -> prepared network) on ``device`` over gathered inputs."""

    def __init__(
        self, nets: Mapping[str, Predictor], device: torch.device, *, max_batch: int = 16, max_wait_ms: float = 5.0
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.nets = dict(nets)
        self.device = device
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_ms) / 1000.0
        self.stats = BatchStats()
        self._queues: dict[str, deque[_Item]] = {name: deque() for name in self.nets}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="i2v-batcher", daemon=True)
        self._thread.start()

    def submit(self, model: str, names: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[Future[Result]]:
        """Queue (3, S, S) inputs for ``model``; each future gives that image's :class:`~i2v_cli.runner.Result`
        (its output, or its error when the network's output was not finite)."""
        if model not in self._queues:
            raise KeyError(f"no {model} model is loaded")
        items = [_Item(n, t, Future()) for n, t in zip(names, tensors, strict=True)]
        with self._cond:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            self._queues[model].extend(items)
            self._cond.notify()
        return [item.future for item in items]

    def close(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then stop the worker (graceful shutdown: queued images still get their results)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _take(self) -> tuple[str, list[_Item]] | None:
        """The next batch to run, waiting as the limits say; None once closed and drained."""
        with self._cond:
            while True:
                waiting = [(q[0].queued, name) for name, q in self._queues.items() if q]
                if not waiting:
                    if self._closed:
                        return None
                    self._cond.wait()
                    continue
                oldest, name = min(waiting)
                queue = self._queues[name]
                left = oldest + self.max_wait - time.monotonic()
                if len(queue) >= self.max_batch or left <= 0 or self._closed:
                    return name, [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
                self._cond.wait(left)

    def _run(self) -> None:
        while (taken := self._take()) is not None:
            name, items = taken
            live = [item for item in items if item.future.set_running_or_notify_cancel()]
            if not live:
                continue
            names = [item.name for item in live]
            batch = Batch(list(range(len(live))), torch.stack([item.tensor for item in live]), {})
            try:
                results = map_batch(self.nets[name], names, batch, self.device)
            except BaseException as exc:  # handed to each waiting request (a 500), the worker goes on
                for item in live:
                    item.future.set_exception(exc)
                continue
            self.stats.batches += 1
            self.stats.images += len(live)
            self.stats.largest = max(self.stats.largest, len(live))
            for item, result in zip(live, results, strict=True):
                item.future.set_result(result)
