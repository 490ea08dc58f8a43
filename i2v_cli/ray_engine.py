"""``--engine ray``: the runs of ``i2v tag`` and ``i2v features`` on a Ray cluster, written as shards to a folder.

The inputs, in the local engine's order, are cut into shards of ``shard_size`` consecutive images; shard ``k``
holds inputs ``k * shard_size`` up to the next shard's first. The shards are the rows of a Ray Dataset: a CPU
task decodes and preprocesses a shard's images (:func:`~i2v_cli.data.decode_in_worker`, so a bad file is an
error record, never a dead task, even one that crashes its decoder), and a pool of actors, each holding the
network once (on a GPU when asked for), runs it and writes the shard's file itself, so only network inputs cross
the object store: as float32 by default (exact), or with ``transfer="uint8"`` as the resized images rounded to
uint8 (a quarter of the bytes; scores move by up to :data:`UINT8_BOUND`), normalised on the actor. The output
folder:

- ``part-00000.jsonl`` (or ``.csv``, ``.parquet``) per shard of ``i2v tag``: the records of a local run, in
  input order; ``part-00000.npy`` + ``part-00000.paths.jsonl`` (a :mod:`i2v_cli.features` pair) and
  ``part-00000.errors.jsonl`` (the ``{"path", "error"}`` records of images without a row) per shard of
  ``i2v features``. Reading the shards in name order gives a local run's order.
- ``manifest.json``: the command, options, model, input count and digest, shard size, and when the run is
  ``complete`` the list of shards with their first input and record count, and the error count.

A shard's file appears by rename once whole (a features shard is whole when its paths file is in place, the
last of its three), and a retried shard rewrites the same name with the same content: a worker killed midway
loses and duplicates nothing. ``resume`` keeps the shards in place and runs the others. Nothing here prints.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .atomic import folder_lock, is_temp_name, write_bytes, write_text
from .config import FEATURE, INPUT_SIZE, MEAN_BGR, TAG
from .errors import I2VError, InputError
from .features import FeatureWriter
from .inputs import expand_inputs, read_path_list
from .store import model_identity, same_weights
from .tags import Selection
from .writers import display, path_fields, render

MANIFEST = "manifest.json"
FORMAT_NAME = "i2v-ray-output"
FORMAT_VERSION = 1
TAG_FORMATS = ("jsonl", "csv", "parquet")
DEFAULT_SHARD_SIZE = 256
#: Testing hook: a folder where each network actor notes its PID, and may be told to pause (see ``_checkpoint``).
HOLD_ENV = "I2V_RAY_HOLD_DIR"
_INPUT_SHAPE = (3, INPUT_SIZE, INPUT_SIZE)
_INPUT_BYTES = 4 * 3 * INPUT_SIZE * INPUT_SIZE
_PIXELS_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)
#: How the network inputs travel from the decoding tasks to the actors: float32, exact (602 KB an image), or
#: uint8, the resized image rounded to 0-255 (150 KB) and normalised on the actor.
TRANSFERS = ("float32", "uint8")
#: The largest change of a score (a probability) that ``transfer="uint8"`` made on the golden models and the
#: benchmark's images (bench/ray_transfer.py), with a margin; tests/test_ray.py holds it.
UINT8_BOUND = 0.02
_CATEGORIES = ("general", "character", "copyright", "rating")


class RayEngineError(I2VError):
    """The Ray run cannot start or go on: Ray missing or unreachable, or an output folder of another run."""


@dataclass(frozen=True)
class RayJob:
    """One ``--engine ray`` run: what to compute, with which model, and where the shards go."""

    kind: str  # TAG or FEATURE
    weights: str
    out: str
    fmt: str  # jsonl, csv or parquet for tags; npy for features
    tags: Sequence[str] = ()
    selection: Selection | None = None
    exclude: frozenset[str] = frozenset()
    binary: bool = False
    batch_size: int = 16
    precision: str = "fp32"  # as run_model's precision and backend
    backend: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    num_workers: int | None = None  # default: one per GPU, else one per 4 CPUs
    gpus_per_worker: float | None = None  # default: 1 where the cluster has GPUs, else 0
    address: str | None = None  # default: $RAY_ADDRESS, a cluster started on this machine, else a new local one
    resume: bool = False
    require_gpus: bool = False  # --device cuda: refuse a cluster without GPUs instead of running on CPUs
    progress: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)  # recorded in the manifest, compared on resume
    transfer: str = "float32"  # one of TRANSFERS; recorded in the manifest's options (it shapes the records)

    def __post_init__(self) -> None:
        if self.transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {', '.join(TRANSFERS)}, got {self.transfer!r}")


@dataclass
class RaySummary:
    """What a run did: images processed now, their errors ``(path, error)``, images skipped as already done."""

    images: int
    errors: list[tuple[str, str]]
    skipped: int
    shards: int
    seconds: float
    workers: int
    gpus_per_worker: float
    input_bytes: int = 0  # network inputs put in the object store by this run's decoding tasks

    @property
    def bytes_per_image(self) -> float:
        """Object-store bytes of network input per image processed (decoded or not) by this run."""
        return self.input_bytes / self.images if self.images else 0.0

    @property
    def throughput(self) -> float:
        """Images processed per second of wall time (ray start-up included)."""
        return self.images / self.seconds if self.seconds > 0 else 0.0


# --------------------------------------------------------------------------------------------------------------
# The output folder


def shard_files(kind: str, fmt: str, k: int) -> list[str]:
    """The file names of shard ``k``, the one whose appearance completes the shard last."""
    stem = f"part-{k:05d}"
    if kind == FEATURE:
        return [f"{stem}.errors.jsonl", f"{stem}.npy", f"{stem}.paths.jsonl"]
    return [f"{stem}.{fmt}"]


def _digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p) + b"\0")
    return "sha256:" + h.hexdigest()


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _plan(job: RayJob, inputs: Sequence[str], model: Mapping[str, str]) -> dict[str, Any]:
    """The manifest's fields that a resumed run must share with the run it resumes."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "command": "tag" if job.kind == TAG else "features",
        "output_format": job.fmt,
        "inputs": len(inputs),
        "inputs_digest": _digest(inputs),
        "shard_size": job.shard_size,
        "model": dict(model),
        "options": {**job.options, "transfer": job.transfer, "precision": job.precision},
        **manifest_cwd(),
    }


def manifest_cwd() -> dict[str, str]:
    """The manifest's ``cwd``, which relative record paths are relative to: its exact bytes (``cwd_b64``) when the
    folder's name is not UTF-8, as records keep a path's (:func:`~i2v_cli.writers.path_fields`)."""
    return path_fields("cwd", os.getcwd())


def cwd_of(manifest: Mapping[str, Any]) -> str:
    """The folder a manifest's relative paths are relative to ("" when it names none: paths as they are); a
    ValueError when the manifest's ``cwd`` or ``cwd_b64`` is damaged (not text, not strict base64, a NUL byte)."""
    raw = manifest.get("cwd_b64")
    if raw:
        if not isinstance(raw, str):
            raise ValueError("cwd_b64 is not a string")
        value = os.fsdecode(base64.b64decode(raw, validate=True))
    else:
        value = manifest.get("cwd", "")
        if not isinstance(value, str):
            raise ValueError("cwd is not a string")
    if "\0" in value:
        raise ValueError("cwd holds a NUL byte")
    return value


def _same_as_an_input_folder(out: Path, inputs: Sequence[str]) -> str | None:
    """The input folder that ``out`` is (the same folder by device and inode), or None."""
    try:
        st = os.stat(out)
    except OSError:
        return None
    for folder in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in inputs):
        with contextlib.suppress(OSError):
            if os.path.samestat(st, os.stat(folder)):
                return folder
    return None


def check_output_folder(
    job: RayJob, inputs: Sequence[str], model: Mapping[str, str]
) -> tuple[dict[str, Any], set[int]]:
    """Check the output folder before anything is written or Ray is reached: a folder of the inputs, another run's
    output (without --resume), or, resuming, a run with other settings are refused. Returns the run's manifest and
    the shards already done."""
    out = Path(job.out)
    plan = _plan(job, inputs, model)
    manifest = out / MANIFEST
    done: set[int] = set()
    if out.exists() and not out.is_dir():
        raise RayEngineError(f"-o {display(str(out))} is not a folder: --engine ray writes a folder of shards")
    folder = _same_as_an_input_folder(out, inputs)
    if folder is not None:
        raise RayEngineError(
            f"-o {display(str(out))} is the folder of inputs {display(folder)}: the shards would lie among the "
            "images; choose another folder"
        )
    if manifest.exists():
        if not job.resume:
            raise RayEngineError(f"{out} holds the output of an earlier run: add --resume, or choose another folder")
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RayEngineError(f"cannot resume: {manifest} is not readable: {exc}") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT_NAME or not isinstance(old.get("model"), dict):
            raise RayEngineError(
                f"cannot resume: {manifest} is not the manifest of an i2v run (--engine ray): choose another folder"
            )
        if isinstance(old.get("options"), dict):  # written before the transfer and the precision were recorded
            old["options"] = {"transfer": "float32", "precision": "fp32", **old["options"]}
        differ = [k for k in ("command", "output_format", "inputs_digest", "shard_size", "options")
                  if old.get(k) != plan[k]]  # fmt: skip
        if not same_weights(old["model"], plan["model"]):
            differ.append("model")
        if differ:
            raise RayEngineError(
                f"cannot resume: {out} was written with other {', '.join(differ)}; rerun the same command, "
                "or choose another folder"
            )
        n = -(-len(inputs) // job.shard_size)
        done = {k for k in range(n) if (out / shard_files(job.kind, job.fmt, k)[-1]).exists()}
    elif out.is_dir() and any(out.glob("part-*")):
        raise RayEngineError(f"{out} holds shard files but no {MANIFEST}: choose an empty or new folder")
    return plan, done


def prepare_output(job: RayJob, inputs: Sequence[str], model: Mapping[str, str]) -> tuple[dict[str, Any], set[int]]:
    """:func:`check_output_folder` (again, now that the folder is held), then the folder made (or, resuming, its
    shards cut off by a kill removed) and the manifest written as running. The caller holds the folder's lock
    (:func:`output_lock`)."""
    plan, done = check_output_folder(job, inputs, model)
    out = Path(job.out)
    for tmp in out.iterdir() if out.is_dir() else ():  # a shard cut off by a kill
        if is_temp_name(tmp.name) and ".part-" in tmp.name:
            with contextlib.suppress(OSError):
                tmp.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / MANIFEST, {**plan, "status": "running"})
    except OSError as exc:
        raise RayEngineError(f"cannot write {out / MANIFEST}: {exc.strerror or exc}") from None
    return plan, done


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """One run writes a folder of shards at a time (its lock: :func:`~i2v_cli.atomic.folder_lock`); another is
    refused. The folder is made here, empty, if it does not exist."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RayEngineError(f"cannot make the folder {display(str(out))}: {exc.strerror or exc}") from None
    try:
        with folder_lock(out, wait=False):
            yield
    except BlockingIOError:
        raise RayEngineError(
            f"another i2v is writing into {display(str(out))}: wait for it to finish, or choose another folder"
        ) from None


def _unreachable(address: str | None, timeout: float = 10.0) -> str | None:
    """Why nothing answers at a ``host:port`` (or ``ray://host:port``) cluster address, or None (it answers, or the
    address is of another kind: ``auto``, none). ray.init retried a wrong address for ever, its own SIGTERM handler
    in place (exit 15)."""
    import socket

    if not address:
        return None
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


@contextlib.contextmanager
def _as_ray_wants() -> Iterator[None]:
    """What ``ray.init`` needs and changes, set right around it: it records the command line and the current folder
    as strict UTF-8 (a name of other bytes failed every run, "cannot reach the Ray cluster"), so they are shown
    (\\xNN) and the folder left for a moment; and it replaces the SIGTERM handler with its own, which exited 15
    without keeping the work: i2v's handlers are put back."""
    import signal
    import sys
    import threading

    argv, cwd = sys.argv, os.getcwd()
    named = [getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, n)]
    handlers = {n: signal.getsignal(n) for n in named}
    sys.argv = [display(a) for a in argv]
    moved = display(cwd) != cwd
    if moved:
        os.chdir("/")
    # The job's entry point is the process's command line as the system gives it (psutil), not sys.argv: shown too.
    # A private function of Ray's; where a version has none, nothing is changed.
    utils = getattr(getattr(sys.modules.get("ray"), "_private", None), "utils", None)
    entrypoint = getattr(utils, "get_entrypoint_name", None)
    if entrypoint is not None:
        utils.get_entrypoint_name = lambda: display(entrypoint())
    try:
        yield
    finally:
        if entrypoint is not None:
            utils.get_entrypoint_name = entrypoint
        sys.argv = argv
        if moved:
            os.chdir(cwd)
        if threading.current_thread() is threading.main_thread():
            for number, handler in handlers.items():
                if handler is not None:
                    signal.signal(number, handler)


def _count_errors(out: Path, kind: str, fmt: str, k: int) -> int:
    """Error records in a finished shard (for the manifest of a resumed run)."""
    name = out / shard_files(kind, fmt, k)[0]
    if kind == FEATURE or fmt == "jsonl":
        with open(name, encoding="utf-8", errors="surrogateescape") as f:
            return sum("error" in json.loads(line) for line in f)
    if fmt == "csv":
        import csv

        with open(name, encoding="utf-8", errors="surrogateescape", newline="") as f:
            return sum(1 for row in csv.DictReader(f) if row["error"])
    import pyarrow.parquet as pq

    return pq.read_table(name, columns=["error"]).column("error").drop_null().__len__()


def read_tag_records(out: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a finished ``i2v tag --engine ray`` folder (JSONL or Parquet shards), in input order."""
    folder = Path(out)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    fmt = manifest["output_format"]
    if fmt not in ("jsonl", "parquet"):
        raise RayEngineError(f"{folder}: records can be read back from jsonl or parquet shards, not {fmt}")
    for shard in manifest["shards"]:
        yield from read_tag_shard(folder / shard["file"], fmt)


def read_tag_shard(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    """The records of one tag shard (``jsonl`` or ``parquet``), in order."""
    if fmt == "jsonl":
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            yield from (json.loads(line) for line in f)
        return
    import pyarrow.parquet as pq

    for row in pq.read_table(path).to_pylist():
        name = {"path": row["path"], **({"path_b64": row["path_b64"]} if row.get("path_b64") else {})}
        if row["error"] is not None:
            yield {**name, "error": row["error"]}
        else:
            yield {**name, **{c: dict(row[c]) for c in _CATEGORIES}}


def expand_ray_inputs(
    specs: Sequence[str], *, recursive: bool = False, stdin: IO[bytes] | None = None, nul: bool = False
) -> list[str]:
    """The local engine's inputs, plus lists of paths: a ``.txt`` file (one a line) or a ``.parquet`` file (its
    ``path`` column, else its first), for dumps too large to name on a command line."""
    paths: list[str] = []
    pending: list[str] = []
    for spec in [*specs, None]:
        kind = os.path.splitext(spec)[1].lower() if spec is not None and os.path.isfile(spec) else None
        if spec is not None and kind not in (".txt", ".parquet"):
            pending.append(spec)
            continue
        if pending:
            paths.extend(expand_inputs(pending, recursive=recursive, stdin=stdin, nul=nul))
            pending = []
        if spec is None:
            break
        if kind == ".txt":
            with open(spec, "rb") as f:
                paths.extend(read_path_list(f, nul, source=display(spec)))
        else:
            import pyarrow.parquet as pq

            try:
                table = pq.read_table(spec)
                column = table.column("path" if "path" in table.column_names else 0).to_pylist()
            except (OSError, ValueError, IndexError) as exc:  # pyarrow's ArrowInvalid is a ValueError
                raise InputError(f"{display(spec)}: not a Parquet list of paths ({exc})") from None
            listed = [p for p in column if p]
            if not all(isinstance(p, str | bytes) and "\0" not in os.fsdecode(p) for p in listed):
                raise InputError(f"{display(spec)}: its path column holds values that are not file names")
            paths.extend(os.fsdecode(p) for p in listed)
    if not paths:
        raise InputError("no input images: the lists of paths given are empty")
    return paths


# --------------------------------------------------------------------------------------------------------------
# Writing one shard (in an actor)


def _parquet_bytes(records: Sequence[Mapping[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    scores = pa.map_(pa.string(), pa.float64())
    schema = pa.schema([("path", pa.string()), ("path_b64", pa.string()), ("error", pa.string()),
                        *((c, scores) for c in _CATEGORIES)])  # fmt: skip
    rows = []
    for r in records:
        fields = path_fields("path", r["path"])
        rows.append({
            "path": fields["path"],
            "path_b64": fields.get("path_b64"),
            "error": display(r["error"]) if "error" in r else None,
            **{c: list(r[c].items()) if c in r else None for c in _CATEGORIES},
        })  # fmt: skip
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


def write_tag_shard(out: Path, fmt: str, k: int, records: Sequence[Mapping[str, Any]]) -> str:
    """Write shard ``k``'s records, atomically (:mod:`i2v_cli.atomic`); return its file name."""
    name = shard_files(TAG, fmt, k)[0]
    data = _parquet_bytes(records) if fmt == "parquet" else render(fmt, records)
    write_bytes(out / name, data)
    return name


def write_feature_shard(out: Path, k: int, records: Sequence[Mapping[str, Any]], **writer: Any) -> str:
    """Write shard ``k``: its error records, then its vectors and paths pair (the paths file last)."""
    names = shard_files(FEATURE, "npy", k)
    write_bytes(out / names[0], render("jsonl", [r for r in records if "error" in r]))
    with FeatureWriter(out / names[1], **writer) as w:
        w.write(records)
    return names[1]


# --------------------------------------------------------------------------------------------------------------
# The Ray side


def _enter(cwd: str) -> None:
    """Work from the driver's folder (where it exists), so relative paths and their error messages match."""
    with contextlib.suppress(OSError):
        os.chdir(cwd)


def round_inputs(inputs: Any) -> np.ndarray:
    """Network inputs (N, 3, S, S) back to the resized RGB images they were made from, rounded to uint8
    (N, S, S, 3): the one lossy step of ``transfer="uint8"`` (each value moves by at most 0.5)."""
    import torch

    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    rgb = (torch.as_tensor(inputs, dtype=torch.float32) + mean).flip(1).permute(0, 2, 3, 1)
    return rgb.round().clamp_(0, 255).to(torch.uint8).numpy()


def normalise(pixels: np.ndarray, device: Any = "cpu") -> Any:
    """uint8 RGB images (N, S, S, 3) to network inputs (N, 3, S, S) on ``device``: the local pipeline's step 3,
    :func:`~i2v_cli.transform.to_network_input` (BGR minus the mean), on the actor. On a GPU the pixels cross
    as uint8 and are normalised there (the same IEEE float32 subtraction, so the same inputs)."""
    import torch

    from .transform import to_network_input

    if not len(pixels):
        return torch.empty((0, *_INPUT_SHAPE), device=device)
    rgb = torch.from_numpy(np.array(pixels, np.uint8)).to(device)
    return torch.stack([to_network_input(p) for p in rgb])


def decode_shards(batch: Any, cwd: str, transfer: str = "float32") -> Any:
    """CPU task: decode and preprocess the images of each shard row; the inputs travel as bytes, float32 or
    (``transfer="uint8"``) rounded to uint8 pixels (:func:`round_inputs`)."""
    import pyarrow as pa
    import torch

    from .data import decode_in_worker

    torch.set_num_threads(1)
    _enter(cwd)
    rows = []
    for row in batch.to_pylist():
        paths = [os.fsdecode(p) for p in row["paths"]]
        decoded = decode_in_worker(paths)  # an image that crashes its decoder fails alone, not the shard's task
        inputs = decoded.inputs if decoded.ok else torch.zeros((0, *_INPUT_SHAPE))
        inputs = round_inputs(inputs) if transfer == "uint8" else inputs.numpy()
        # Arrow strings are UTF-8: a message naming a file that is not UTF-8 travels in its readable form.
        errors = [None if i not in decoded.errors else display(decoded.errors[i]) for i in range(len(paths))]
        rows.append({"shard": row["shard"], "paths": row["paths"], "errors": errors, "inputs": inputs.tobytes()})
    return pa.Table.from_pylist(rows, schema=_decoded_schema())


def _decoded_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("shard", pa.int64()), ("paths", pa.list_(pa.binary())), ("errors", pa.list_(pa.string())),
                      ("inputs", pa.large_binary())])  # fmt: skip


class NetworkWorker:
    """Ray actor: loads the network once, then per shard runs it over the decoded inputs and writes the shard."""

    def __init__(self, job: RayJob, cwd: str, device: str) -> None:
        import torch

        from .inference import prepare_for_inference
        from .weights import load_model

        _enter(cwd)
        if device == "cpu":
            torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or 1)))
        self.job = job
        self.out = Path(job.out)
        self.model, self.info = load_model(job.weights, kind=job.kind, device=device)
        self.net = prepare_for_inference(self.model, precision=job.precision, backend=job.backend)
        self.device = torch.device(device)
        self.written = 0

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa
        import torch

        from .data import Batch
        from .pipeline import FeatureRecords, TagRecords
        from .runner import map_batch

        job = self.job
        make = TagRecords(job.tags, job.selection, job.exclude) if job.kind == TAG else FeatureRecords(job.binary)
        rows = []
        for row in batch.to_pylist():
            paths = [os.fsdecode(p) for p in row["paths"]]
            errors: list[str | None] = row["errors"]
            ok = [i for i, e in enumerate(errors) if e is None]
            if job.transfer == "uint8":
                inputs = normalise(np.frombuffer(row["inputs"], np.uint8).reshape(-1, *_PIXELS_SHAPE), self.device)
            else:
                inputs = torch.from_numpy(np.frombuffer(row["inputs"], np.float32).copy()).reshape(-1, *_INPUT_SHAPE)
            decoded = Batch(ok, inputs, {i: e for i, e in enumerate(errors) if e is not None})
            records = make(map_batch(self.net, paths, decoded, self.device, job.batch_size))
            _checkpoint(self.written)
            if job.kind == TAG:
                name = write_tag_shard(self.out, job.fmt, row["shard"], records)
            else:
                model = model_identity(self.info)
                dim = self.model.arch.feature_dim
                name = write_feature_shard(self.out, row["shard"], records, dim=dim, binary=job.binary, model=model)
            self.written += 1
            failed = [(r["path"], r["error"]) for r in records if "error" in r]
            rows.append({"shard": row["shard"], "file": name, "count": len(paths), "input_bytes": len(row["inputs"]),
                         "error_paths": [os.fsencode(p) for p, _ in failed],
                         "error_messages": [display(e) for _, e in failed]})  # fmt: skip
        return pa.Table.from_pylist(rows, schema=_summary_schema())


def _summary_schema() -> Any:
    import pyarrow as pa

    return pa.schema([("shard", pa.int64()), ("file", pa.string()), ("count", pa.int64()), ("input_bytes", pa.int64()),
                      ("error_paths", pa.list_(pa.binary())), ("error_messages", pa.list_(pa.string()))])  # fmt: skip


def _checkpoint(written: int) -> None:
    """Testing hook: with ``$I2V_RAY_HOLD_DIR`` set, note this actor's PID there, and while a file ``hold`` there
    says N, wait before writing any shard after the first N this actor wrote (so a test can kill it midway)."""
    folder = os.environ.get(HOLD_ENV)
    if not folder:
        return
    Path(folder, f"actor-{os.getpid()}").write_text(str(written))
    hold = Path(folder, "hold")
    while hold.exists():
        with contextlib.suppress(OSError, ValueError):
            if written < int(hold.read_text() or 0):
                return
        Path(folder, f"holding-{os.getpid()}").touch()
        time.sleep(0.05)


def _resources(job: RayJob) -> tuple[int, float]:
    """Actors and GPUs per actor: as asked, else one actor per GPU of the cluster, else one per 4 CPUs."""
    import ray

    have = ray.cluster_resources()
    gpus = job.gpus_per_worker if job.gpus_per_worker is not None else (1.0 if have.get("GPU", 0) >= 1 else 0.0)
    if job.num_workers is not None:
        return job.num_workers, gpus
    if gpus > 0:
        return max(1, int(have.get("GPU", 0) // gpus)), gpus
    return max(1, int(have.get("CPU", 1)) // 4), gpus


def run_job(job: RayJob, inputs: Sequence[str], model: Mapping[str, str]) -> Iterator[RaySummary]:
    """Run ``job`` over ``inputs`` on Ray; yield a summary after each shard written (the last one is final).

    ``model`` (``source``, ``sha256``) is recorded in the manifest. Raises RayEngineError when the output folder
    belongs to another run or Ray cannot be reached.
    """
    try:
        import ray
    except ImportError:
        raise RayEngineError(
            "--engine ray needs Ray: pip install 'ray[data]' pyarrow (or, in the i2v checkout, pip install '.[ray]')"
        ) from None
    check_output_folder(job, inputs, model)  # before Ray is reached: a refused folder is said at once, nothing written
    unreachable = _unreachable(job.address)
    if unreachable is not None:
        raise RayEngineError(f"cannot reach the Ray cluster {job.address}: {unreachable}")
    with output_lock(Path(job.out)):
        try:
            with _as_ray_wants():
                ray.init(address=job.address, logging_level="WARNING", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"cannot reach the Ray cluster {job.address or ''}".replace("  ", " ").rstrip()
            raise RayEngineError(f"{where}: {exc}") from None
        try:
            yield from _run(ray, job, inputs, model)
        finally:
            ray.shutdown()


def _run(ray: Any, job: RayJob, inputs: Sequence[str], model: Mapping[str, str]) -> Iterator[RaySummary]:
    """:func:`run_job` once Ray is reached and the folder is held."""
    size = job.shard_size
    # Each decoding task holds a shard's inputs twice: a --shard-size the cluster cannot hold waited for ever.
    memory = (256 << 20) + 2 * min(size, max(1, len(inputs))) * _INPUT_BYTES
    have = ray.cluster_resources().get("memory")
    if have is not None and memory > have:
        raise RayEngineError(
            f"--shard-size {size}: a decoding task needs {memory / 2**30:.1f} GiB, more than the cluster's "
            f"{have / 2**30:.1f} GiB: use a smaller --shard-size"
        )
    plan, done = prepare_output(job, inputs, model)
    started = time.perf_counter()
    n = -(-len(inputs) // job.shard_size)
    todo = [k for k in range(n) if k not in done]
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = job.progress
    workers, gpus = _resources(job)
    if job.require_gpus and not ray.cluster_resources().get("GPU"):
        raise RayEngineError("--device cuda asked for, but the Ray cluster has no GPU: use --device cpu")
    summary = RaySummary(0, [], sum(min(size, len(inputs) - k * size) for k in done), len(done), 0.0, workers, gpus)
    if todo:
        items = [{"shard": k, "paths": [os.fsencode(p) for p in inputs[k * size : (k + 1) * size]]} for k in todo]
        cwd = os.getcwd()
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        # Decoding runs in tasks of its own: its memory reservation (a worker with torch, and a shard's inputs
        # twice) also keeps Ray from fusing it into the actors.
        ds = ds.map_batches(decode_shards, fn_kwargs={"cwd": cwd, "transfer": job.transfer}, batch_size=1,
                            batch_format="pyarrow", num_cpus=1, memory=memory)  # fmt: skip
        ds = ds.map_batches(
            NetworkWorker,
            fn_constructor_kwargs={"job": job, "cwd": cwd, "device": "cuda" if gpus > 0 else "cpu"},
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=workers),
            num_gpus=gpus,
            num_cpus=0.5 if gpus > 0 else 1,
        )
        for batch in ds.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=0):
            for row in batch.to_pylist():
                summary.images += row["count"]
                summary.input_bytes += row["input_bytes"]
                summary.shards += 1
                summary.errors.extend(zip(map(os.fsdecode, row["error_paths"]), row["error_messages"], strict=True))
                summary.seconds = time.perf_counter() - started
                yield summary
    summary.seconds = time.perf_counter() - started
    out = Path(job.out)
    earlier = sum(_count_errors(out, job.kind, job.fmt, k) for k in done)
    shards = [{"file": shard_files(job.kind, job.fmt, k)[1 if job.kind == FEATURE else 0], "first": k * size,
               "count": min(size, len(inputs) - k * size)} for k in range(n)]  # fmt: skip
    _write_json(out / MANIFEST, {**plan, "status": "complete", "records": len(inputs),
                                 "errors": earlier + len(summary.errors), "shards": shards})  # fmt: skip
    yield summary
