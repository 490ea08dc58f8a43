"""The decoding workers' multiprocessing context (i2v_cli/worker_context.py): neither a worker killed midway through
sending a batch nor garbage left in the parent can hang a run. Each test here hung (or failed) before it."""

from __future__ import annotations

import contextlib
import gc
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2v_cli import data
from i2v_cli.worker_context import worker_context

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="fork workers, and monkeypatches carried into them")

BIG = 4 << 20  # far more than a pipe holds (64 KiB), like a decoded batch (602 KB an image)


@pytest.fixture(autouse=True)
def _sigchld_as_it_was():
    """SIGCHLD at its default during each test, and as it was after it. torch installs a handler for good when a
    loader is first iterated in the main thread (decode_in_worker here); it raises a worker's death in the main
    thread wherever that thread is, and would do so in later tests whose workers die in the reader thread."""
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)


def _put_and_die(q, payload: bytes) -> None:
    q.put(payload)
    time.sleep(0.5)  # the feeder thread has filled the pipe with the message's first bytes and waits for a reader
    os.kill(os.getpid(), signal.SIGKILL)


def _get_in_thread(q, timeout: float) -> list:
    """``q.get(timeout=...)`` in a thread: [the object] or [the exception], or [] if it is still blocked after 60 s."""
    got: list = []

    def get() -> None:
        try:
            got.append(q.get(timeout=timeout))
        except BaseException as exc:  # handed to the test to look at
            got.append(exc)

    t = threading.Thread(target=get, daemon=True)
    t.start()
    t.join(60)
    return got


def test_a_writer_killed_midway_through_a_message_costs_the_reader_a_timeout_not_a_hang():
    ctx = worker_context()
    q = ctx.Queue()
    writer = ctx.Process(target=_put_and_die, args=(q, b"x" * BIG))
    writer.start()
    writer.join(60)
    assert writer.exitcode == -signal.SIGKILL
    got = _get_in_thread(q, 1.0)  # the stdlib queue waited here for the rest of the message for ever
    assert len(got) == 1 and isinstance(got[0], queue.Empty)


def _put(q, payloads: list[bytes]) -> None:
    for p in payloads:
        q.put(p)
    q.close()
    q.join_thread()


def test_a_message_read_across_timeouts_arrives_whole_and_in_order():
    ctx = worker_context()
    q = ctx.Queue()
    payloads = [bytes([i]) * n for i, n in enumerate([BIG, 10, BIG + 7, 0, 70_000])]
    writer = ctx.Process(target=_put, args=(q, payloads))
    writer.start()
    got, empties = [], 0
    deadline = time.monotonic() + 120
    while len(got) < len(payloads) and time.monotonic() < deadline:
        try:
            got.append(q.get(timeout=0.0005))
        except queue.Empty:
            empties += 1
    writer.join(60)
    assert got == payloads
    assert empties > 0  # some reads did stop inside a message


class _Noted:
    """Garbage with a finalizer that notes the process it runs in."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.cycle = self

    def __del__(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


def _pictures(folder: Path, n: int, boom: int | None = None) -> list[str]:
    paths = []
    for i in range(n):
        path = folder / (f"{i}-BOOM.png" if i == boom else f"{i}.png")
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_a_forked_worker_leaves_its_parents_garbage_alone(tmp_path, monkeypatch):
    """A worker's garbage collection once ran the destructor of an ONNX Runtime session the parent had dropped:
    it waited for the parent's threads and the worker hung. Here the garbage notes where it is finalised."""
    paths = _pictures(tmp_path, 2)
    original = data.load_and_preprocess

    def collect_then_load(path):
        gc.collect()  # what the worker's own allocations do sooner or later
        return original(path)

    monkeypatch.setattr(data, "load_and_preprocess", collect_then_load)
    log = tmp_path / "finalised"
    gc.disable()  # the parent must not collect the garbage before the worker starts
    try:
        _Noted(log)
        batch = data.decode_in_worker(paths)
    finally:
        gc.enable()
    assert batch.ok == [0, 1]
    gc.collect()
    assert log.read_text() == f"{os.getpid()}\n"  # once, in the parent


@pytest.mark.timeout(120)  # a regression here is a hang
def test_a_run_after_an_onnx_runtime_session_became_garbage(tmp_path, tag_weights):
    """The hang itself: a session dropped in a reference cycle (a kept traceback does that), then a forked worker."""
    pytest.importorskip("onnxruntime")
    from i2v_cli.inference import prepare_for_inference
    from i2v_cli.weights import load_model

    paths = _pictures(tmp_path, 3)
    model, _ = load_model(tag_weights)
    net = prepare_for_inference(model, backend="onnxruntime")
    net(data.decode_in_worker(paths).inputs)  # its thread pool has run
    cycle: list = [net]
    cycle.append(cycle)
    del net, cycle
    assert data.decode_in_worker(paths).ok == [0, 1, 2]


@pytest.mark.timeout(120)  # a regression here is a hang
def test_a_worker_killed_while_the_reader_is_not_reading_costs_one_image(tmp_path, monkeypatch):
    """The consumer holds the first batch until the worker is dead: by then the reader thread, its hand-off queue
    full, has stopped reading, and the worker's feeder thread is midway through the batch before the crash."""
    paths = _pictures(tmp_path, 8, boom=5)
    died = tmp_path / "died"
    original = data.load_and_preprocess

    def load(path):
        if "BOOM" in os.path.basename(path):
            time.sleep(0.5)  # the feeder thread has begun sending image 4 and waits for a reader
            died.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path)

    monkeypatch.setattr(data, "load_and_preprocess", load)
    batches = data.iter_batches(paths, batch_size=1, workers=1)
    got = [next(batches)]
    deadline = time.monotonic() + 60
    while not died.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert died.exists()
    got.extend(batches)
    assert [b.ok for b in got] == [[0], [1], [2], [3], [4], [], [6], [7]]
    assert got[5].errors == {5: f"{paths[5]}: the image decoder crashed on this file (its worker process died)"}


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids |= {int(k) for k in (task / "children").read_text().split()}
    return kids


@pytest.mark.timeout(120)
def test_a_worker_leaves_when_its_run_is_killed(tmp_path, tag_weights):
    """SIGKILL of `i2v tag -j 1`: its decoding worker lived on for ever (blocked at exit on its queue's full pipe),
    holding the output's lock, so the next run was refused as "another i2v run is writing"."""
    import subprocess

    folder = tmp_path / "imgs"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    for i in range(80):
        Image.fromarray(np.roll(noise, i, axis=1)).save(folder / f"p{i:02d}.png", compress_level=1)
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "i2v_cli", "tag", str(folder), "-w", str(tag_weights), "-j", "1", "-b", "1", "-o",
           str(out)]  # fmt: skip
    run = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (workers := _children(run.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert workers, "no decoding worker started"
        time.sleep(1.0)  # it decodes ahead: its batches fill the pipe that nobody will read
        run.kill()
        run.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if Path(f"/proc/{w}").exists()]
        for w in left:
            os.kill(w, signal.SIGKILL)
        assert not left, "the worker outlived its killed run"
    finally:
        run.kill()
    again = subprocess.run([*cmd, "--resume", "-j", "0"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert len(out.read_text().splitlines()) == 80
