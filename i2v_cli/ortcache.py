"""ONNX Runtime sessions on cached exports, fast to start: torch-free, so a run can open its session while torch
is still being imported.

Two caches beside the exports of :mod:`i2v_cli.inference` (``onnx/``), both in ``onnx-ort/`` under the cache
folder, both rebuilt quietly when missing or damaged:

- ONNX Runtime's optimised graph of each export, made for this CPU. Optimising (mostly reordering the weights
  into the blocked convolution layout) took 0.3-0.5 s of a one-image run on a 2-core CPU; loading the saved
  graph with optimisation off does not repeat it and computes the same.
- ``weights/*.json``: which export a tag weight file's network has, keyed by the file's path and recognised as
  unchanged by its stat (device, inode, size, modification and change times, as git's index and ccache do),
  so that a run finds its session without reading the weights (about 0.3 s more).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_bytes
from .config import TAG
from .errors import OutputError
from .store import file_identity, onnx_cache_dir

#: Sub-folder of the cache (beside ``onnx/``) holding ONNX Runtime's optimised graphs and the weights' records.
OPTIMISED_FOLDER = "onnx-ort"


def ort_errors() -> tuple[type[BaseException], ...]:
    """What ONNX Runtime raises for a model it cannot load (its own exception classes, not RuntimeError's)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception))
    return (*own, RuntimeError, ValueError, OSError)


def session_options(threads: int, save_to: Path | None = None, optimised: bool = False) -> Any:
    """ONNX Runtime options for i2v's sessions: ``threads`` intra-op threads that spin between the operators of a
    call, as a plain session's do, and stop when it returns (a thread spinning between calls takes a core from the
    decoding workers); one inter-op thread; ``save_to`` saves the optimised graph; ``optimised`` loads one without
    optimising it again. Spinning within calls only: the feature network 0.996x a plain session model-only, against
    0.984x with no spinning at all (median of 7 alternating rounds)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    if optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def new_session(model: str | bytes, threads: int, save_to: Path | None = None) -> Any:
    """An ONNX Runtime CPU session on an ONNX file or its bytes, fully optimised (see :func:`session_options`)."""
    import onnxruntime as ort

    return ort.InferenceSession(model, session_options(threads, save_to), providers=["CPUExecutionProvider"])


def cpu_fingerprint() -> str:
    """What ONNX Runtime's optimised graph depends on besides the model: the CPU's model and instruction sets
    (the blocked convolution layout follows the vector width), the ONNX Runtime version and the platform."""
    import onnxruntime as ort

    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        lines = {line for line in f.read(65536).splitlines() if line.startswith(("model name", "flags"))}
        cpu = "\n".join(sorted(lines))
    return f"{ort.__version__}:{platform.machine()}:{platform.system()}:{cpu}"


def optimised_path(export: Path) -> Path | None:
    """Where ONNX Runtime's optimised graph of the cached ``export`` file is kept: keyed by the file's size and
    modification time (a rewritten export has another) and by :func:`cpu_fingerprint` (the graph is made for
    this CPU: a cache shared with another machine gets its own); None when the export is not there."""
    try:
        st = export.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{export.name}:{st.st_size}:{st.st_mtime_ns}:{cpu_fingerprint()}".encode())
    return export.parent.with_name(OPTIMISED_FOLDER) / f"{export.stem}-{key.hexdigest()[:16]}.onnx"


def open_optimised(export: Path, threads: int) -> Any:
    """A session on the optimised graph ONNX Runtime made of this very ``export`` on this machine (nothing to
    optimise again), or None when there is none; a damaged one is deleted (made again from the export)."""
    import onnxruntime as ort

    optimised = optimised_path(export)
    if optimised is None or not optimised.is_file():
        return None
    try:
        return ort.InferenceSession(
            str(optimised), session_options(threads, optimised=True), providers=["CPUExecutionProvider"]
        )
    except ort_errors():
        with contextlib.suppress(OSError):
            optimised.unlink()
        return None


def session_saving_optimised(session: Callable[[str, Path | None], Any], export: Path) -> Any:
    """``session(export, save_to)`` on the cached ``export``, its optimised graph kept for the next run. The
    graph goes through a temporary folder and is written atomically; older graphs of the same export are
    removed. A cache that cannot be written costs only the saving."""
    target = optimised_path(export)
    try:
        if target is None:
            raise FileNotFoundError(export)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(dir=target.parent, prefix=".i2v-")
    except OSError:
        return session(str(export), None)
    with tmp as folder:
        made = Path(folder) / target.name
        result = session(str(export), made)
        with contextlib.suppress(OSError, OutputError):
            if made.is_file():
                write_bytes(target, made.read_bytes())
                for old in target.parent.glob(f"{export.stem}-*.onnx"):
                    if old != target:
                        old.unlink()
    return result


def open_cached(export: Path, threads: int) -> Any:
    """A session on a cached export (its optimised graph when there is one), or None when it cannot be loaded."""
    session = open_optimised(export, threads)
    if session is not None:
        return session
    try:
        return session_saving_optimised(lambda model, save_to: new_session(model, threads, save_to), export)
    except ort_errors():
        return None


# --------------------------------------------------------------------------------------------------------------
# The export of a weight file, found without reading the file


def _record_path(weights: Path, cache_dir: Path | None) -> Path:
    """Where the record of ``weights``'s tag export lives: one small JSON file per (resolved) weight path."""
    key = hashlib.sha256(os.fsencode(os.path.realpath(weights))).hexdigest()[:32]
    return onnx_cache_dir(cache_dir).with_name(OPTIMISED_FOLDER) / "weights" / f"{key}.json"


def _torch_identity() -> list[int] | None:
    """The installed torch, recognised without importing it (0.7 s or more): its ``version.py``'s identity. The
    export's name depends on the torch version, so a record made under another torch is not used."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    return file_identity(Path(spec.origin).with_name("version.py"))


def remember_export(weights: Path, before: list[int], info: dict[str, Any], export: Path | None) -> None:
    """After the tag network of ``weights`` (whose :func:`file_identity` was ``before`` the load) got a session on
    the cached ``export``: record it, so that :func:`recall_export` finds it next time without loading the
    weights. Nothing is recorded when the file changed meanwhile or the cache is not writable."""
    if export is None or info.get("kind") != TAG:
        return
    with contextlib.suppress(OSError, OutputError):
        if file_identity(weights) != before:
            return
        record = {
            "weights": os.fsencode(os.path.realpath(weights)).hex(),
            "identity": before,
            "torch": _torch_identity(),
            "export": export.name,
            "info": info,
        }
        target = _record_path(weights, export.parent.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(target, json.dumps(record, sort_keys=True).encode())


def recall_export(
    weights: Path, threads: int, cache_dir: Path | None = None
) -> tuple[Any, Path, dict[str, Any]] | None:
    """An ONNX Runtime session of ``weights``'s tag network, its export and the weights' info (``source``,
    ``sha256``, ...) when an earlier run recorded the export (:func:`remember_export`) and the weight file is
    unchanged since (same device, inode, size, modification and change times), torch the same install, the record
    whole (an info with its ``source`` and ``sha256``) and the export still loadable; else None, and the caller
    loads the weights as usual."""
    try:
        record = json.loads(_record_path(weights, cache_dir).read_bytes())
        same = (
            record["weights"] == os.fsencode(os.path.realpath(weights)).hex()
            and record["identity"] == file_identity(weights)
            and record["torch"] == _torch_identity()
            and record["info"]["kind"] == TAG
            # what a run takes from the record besides the export (its job file names the weights by these)
            and all(isinstance(record["info"].get(key), str) for key in ("source", "sha256", "tensors"))
        )
        name = str(record["export"])
    except (OSError, ValueError, KeyError, TypeError):  # no record, or one that is not ours to trust
        return None
    export = onnx_cache_dir(cache_dir) / name
    if not same or "/" in name or os.sep in name or not export.is_file():
        return None
    session = open_cached(export, threads)
    return None if session is None else (session, export, dict(record["info"]))


class SessionNet:
    """A tag network's ONNX Runtime session on its cached export as a predictor of NumPy arrays: a float32
    (N, 3, S, S) batch to its (N, out) output, the same values :class:`i2v_cli.inference.OnnxRuntimeNet` gives
    for the same session (its outputs do not depend on the session's thread count or the batch's size:
    measured). ``arrays`` tells :func:`i2v_cli.runner.run_model` to feed it without torch."""

    arrays = True

    def __init__(self, session: Any, export: Path) -> None:
        self.session, self.export = session, export
        self.input_name = session.get_inputs()[0].name
        self.name = "onnxruntime fp32 on cpu (cached export)"
        self.notes: list[str] = []

    def __call__(self, x: Any) -> Any:
        """Run a float32 batch through the session."""
        import numpy as np

        (y,) = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})
        return y

    def describe(self) -> str:
        """What runs the network, in one line (as the other predictors' ``describe``)."""
        return "; ".join([self.name, *self.notes])
