"""The multiprocessing context of the decoding workers (:func:`worker_context`): the platform's own, with two changes,
each closing a way a run could hang for ever when it starts or loses a DataLoader worker.

- A forked worker never collects its parent's garbage. Objects the parent no longer uses but has not collected yet
  (an ONNX Runtime session in a reference cycle, left by an earlier run in the same process) are copied into the
  child, whose first garbage collection ran their destructors there: ONNX Runtime's waited in
  ``pthread_cond_destroy`` for thread-pool threads that exist only in the parent, and the worker never decoded
  anything. Every object that exists when a worker forks is frozen (:func:`gc.freeze`) just before the fork and
  thawed in the parent just after, with the GIL held throughout; the child leaves them frozen.
- A reader never waits for ever inside a message whose writer died. A worker hands its batch (hundreds of KB) to
  a feeder thread and decodes on; when the next image kills it (a decoder crash, the out-of-memory killer) while
  the feeder is midway through that batch, the stdlib queue's reader waited for the rest of the message for ever,
  and torch's check for dead workers, made when a read times out, never came. :class:`ResumableQueue` times out
  inside a message too and goes on from the same byte at the next read.
- A worker leaves when its parent dies. With the parent killed (SIGKILL, the out-of-memory killer), torch's worker
  noticed and stopped, then waited at its exit for its queue's feeder thread, itself blocked for ever on a full pipe
  whose reading end the worker holds too: the orphan kept the run's files open, its output's lock with them, and
  the next run was refused as "another i2v run". Each worker watches its parent's pid and exits at once
  (``os._exit``) within :data:`PARENT_CHECK_S` of its death.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import os
import queue
import signal
import struct
import sys
import threading
import time
from multiprocessing import context, queues
from multiprocessing.reduction import ForkingPickler
from typing import Any

_forking = threading.local()


def _freeze_before_fork() -> None:
    # Skipped when the program freezes objects itself (gc.freeze before forking workers of its own): its frozen
    # objects are its to thaw, and thawing ours would thaw them too.
    _forking.froze = getattr(_forking, "worker", False) and gc.get_freeze_count() == 0
    if _forking.froze:
        gc.freeze()


def _thaw_in_parent() -> None:
    if getattr(_forking, "froze", False):
        gc.unfreeze()
        _forking.froze = False


if hasattr(os, "register_at_fork"):  # what runs between these two, in the forking thread, is os.fork itself
    os.register_at_fork(before=_freeze_before_fork, after_in_parent=_thaw_in_parent)


#: Seconds between a worker's looks at whether its parent is alive.
PARENT_CHECK_S = 0.5


def _leave_with(parent: int) -> None:
    """Exit this process as soon as ``parent`` is no longer its parent (it died: the process was re-parented)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


class _WorkerProcess(context.ForkProcess if sys.platform != "win32" else context.Process):  # type: ignore[misc]
    """A forked worker that starts with the parent's objects out of reach of its garbage collector, and leaves when
    its parent dies."""

    def start(self) -> None:
        _forking.worker = True
        self._i2v_parent = os.getpid()  # copied into the child by the fork
        try:
            super().start()
        finally:
            _forking.worker = False

    def run(self) -> None:
        # The parent's signal handlers came with the fork: Ctrl-C at a terminal (SIGINT to the whole process group)
        # raised its "interrupted" in the worker too, which then left its loop and waited at exit for its queue's
        # feeder, blocked on a pipe nobody read, with SIGTERM ignored (the handler's clean-up rule): the parent's
        # shutdown waited for it for ever. Ctrl-C is the parent's to handle (it stops the workers); SIGTERM and
        # SIGHUP end a worker at once.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        threading.Thread(target=_leave_with, args=(self._i2v_parent,), name="i2v-parent-watch", daemon=True).start()
        super().run()


class ResumableQueue(queues.Queue):
    """A multiprocessing Queue whose ``get`` with a timeout times out inside a message as well as between
    messages, keeping the bytes read so far for the next ``get``: a writer that dies midway costs its message,
    not the reader. POSIX only (it reads the pipe's file descriptor); one reader at a time, under the queue's lock."""

    def __init__(self, maxsize: int = 0, *, ctx: Any) -> None:
        super().__init__(maxsize, ctx=ctx)
        self._partial = bytearray()

    def __setstate__(self, state: Any) -> None:
        super().__setstate__(state)
        self._partial = bytearray()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """The next object, as :meth:`multiprocessing.Queue.get`; raises queue.Empty when ``timeout`` runs out
        before a whole message is in, whether or not part of one came."""
        if self._closed:  # type: ignore[attr-defined]
            raise ValueError(f"Queue {self!r} is closed")
        if not block:
            timeout = 0.0
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        if not self._rlock.acquire(True, timeout):  # type: ignore[attr-defined]
            raise queue.Empty
        try:
            message = self._read_message(deadline)
        finally:
            self._rlock.release()  # type: ignore[attr-defined]
        self._sem.release()  # type: ignore[attr-defined]
        return ForkingPickler.loads(message)

    def _read_message(self, deadline: float | None) -> memoryview:
        reader = self._reader  # type: ignore[attr-defined]
        buf = self._partial
        while (missing := _missing(buf)) > 0:
            if not reader.poll(None if deadline is None else max(0.0, deadline - time.monotonic())):
                raise queue.Empty
            chunk = os.read(reader.fileno(), min(missing, 1 << 20))  # readable: returns at once
            if not chunk:
                raise EOFError("the queue's pipe was closed")
            buf += chunk
        self._partial = bytearray()
        return memoryview(buf)[_header_size(buf) :]


def _header_size(buf: bytearray) -> int:
    # multiprocessing.connection's framing: a 4-byte signed big-endian length, or -1 and an 8-byte one (3.8+).
    return 12 if struct.unpack("!i", buf[:4])[0] == -1 else 4


def _missing(buf: bytearray) -> int:
    """How many bytes the message begun in ``buf`` still lacks (its header first)."""
    if len(buf) < 4:
        return 4 - len(buf)
    (size,) = struct.unpack("!i", buf[:4])
    if size == -1:
        if len(buf) < 12:
            return 12 - len(buf)
        (size,) = struct.unpack("!Q", buf[4:12])
    return _header_size(buf) + size - len(buf)


@functools.cache
def _context_class(base: type[context.BaseContext]) -> type[context.BaseContext]:
    attrs: dict[str, Any] = {}
    if sys.platform != "win32":

        def make_queue(self: context.BaseContext, maxsize: int = 0) -> ResumableQueue:
            return ResumableQueue(maxsize, ctx=self.get_context())

        attrs["Queue"] = make_queue
    if getattr(base, "_name", None) == "fork":
        attrs["Process"] = _WorkerProcess
    return type(f"I2VWorker{base.__name__}", (base,), attrs)


def worker_context() -> context.BaseContext:
    """The context for ``DataLoader(multiprocessing_context=...)``: the process's default start method (fork on
    Linux), its workers started and its queues read as the module's docstring says."""
    default = multiprocessing.get_context()
    return _context_class(type(default))()
