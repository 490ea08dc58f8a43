"""Feature files: a ``.npy`` matrix of vectors and, beside it, the image path of every row.

``i2v features -o vecs.npy`` writes two files that belong together:

- ``vecs.npy``: the vectors, a plain NumPy array that ``np.load`` (and ``np.load(mmap_mode="r")``) reads:
  float32 (N, 4096) for the ``encode1`` feature, uint8 (N, 512) for the binary feature (the dtype tells
  which). Only images that were processed have a row, so rows are dense and in input order.
- ``vecs.paths.jsonl``: a header line (a JSON object: format, kind, row count, feature length, the model's
  source and SHA-256, the working folder the paths are relative to, and a fingerprint of the vectors), then
  one JSON string per row: line ``i + 2`` of the file is the path of row ``i``.

Both are written as they go (rows are appended batch by batch: memory stays bounded however many images)
under temporary names beside their targets, and renamed into place at the end (on Ctrl-C too, with the rows
done so far), so a pair in place is never half-written. :func:`read_features` opens a pair and checks that
it belongs together (row counts, dtype, feature length, fingerprint), so a path can never be paired with
another image's row. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import I2VError
from .writers import JsonlWriter, Sink

PathLike = str | os.PathLike[str]

#: The ``format`` field of a paths file's header, and the version of the layout described above.
FORMAT_NAME = "i2v-features"
FORMAT_VERSION = 1
#: Suffix of the paths file: ``vecs.npy`` -> ``vecs.paths.jsonl``.
PATHS_SUFFIX = ".paths.jsonl"

_NPY_MAGIC = b"\x93NUMPY\x01\x00"
#: Total size of the ``.npy`` header written here: fixed, so it can be rewritten in place with the final
#: row count (a multiple of 64, as NumPy aligns its own headers).
_NPY_HEADER_BYTES = 128
#: Rows hashed into the fingerprint, evenly spaced over the file (first and last included).
_FINGERPRINT_ROWS = 16


class FeatureFileError(I2VError):
    """A feature file cannot be written or read, or its vectors and paths do not belong together."""


def paths_file_for(vectors: PathLike) -> Path:
    """The paths file that goes with a vectors file: ``vecs.npy`` -> ``vecs.paths.jsonl``."""
    p = Path(vectors)
    stem = p.name[: -len(".npy")] if p.name.lower().endswith(".npy") else p.name
    return p.with_name(stem + PATHS_SUFFIX)


def _npy_header(dtype: np.dtype, rows: int, width: int) -> bytes:
    """A version 1.0 ``.npy`` header for a C-ordered (rows, width) array, padded to ``_NPY_HEADER_BYTES``."""
    text = f"{{'descr': '{dtype.str}', 'fortran_order': False, 'shape': ({rows}, {width}), }}"
    room = _NPY_HEADER_BYTES - len(_NPY_MAGIC) - 2
    if len(text) + 1 > room:  # not reachable for two dimensions below 10**20
        raise FeatureFileError(f"cannot describe a ({rows}, {width}) array in a .npy header")
    text = text.ljust(room - 1) + "\n"
    return _NPY_MAGIC + room.to_bytes(2, "little") + text.encode("latin1")


def _fingerprint(vectors: np.ndarray) -> str:
    """SHA-256 of a few evenly spaced rows and of the shape: cheap to check, and differs between runs."""
    h = hashlib.sha256(f"{vectors.dtype.str} {vectors.shape}".encode())
    n = vectors.shape[0]
    for i in sorted({int(i) for i in np.linspace(0, n - 1, min(n, _FINGERPRINT_ROWS))}) if n else ():
        h.update(np.ascontiguousarray(vectors[i]).tobytes())
    return "sha256:" + h.hexdigest()


def _encode_path(path: str) -> str:
    """A path as one JSON line; a name that is not valid UTF-8 keeps its bytes (surrogate escapes)."""
    return json.dumps(path, ensure_ascii=False) + "\n"


def _tmp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def _oserror(path: Path, exc: OSError) -> FeatureFileError:
    return FeatureFileError(f"cannot write {path}: {exc.strerror or exc}")


class FeatureWriter(Sink):
    """Append feature vectors with their image paths; :meth:`close` puts ``vectors`` and its paths file in place.

    ``binary`` chooses the format of the rows given to :meth:`write`: uint8 packed bits (``dim`` bits, so
    ``dim / 8`` bytes a row) or float32 (``dim`` values a row). ``model`` (``source``, ``sha256``) is recorded
    in the header, as is the working folder that relative paths start from. Usable as a context manager:
    on Ctrl-C it puts in place the rows written so far; any other exception removes its temporary files.
    """

    def __init__(
        self,
        vectors: PathLike,
        *,
        dim: int,
        binary: bool = False,
        model: dict[str, str] | None = None,
    ) -> None:
        if dim <= 0 or (binary and dim % 8):
            raise ValueError(f"dim must be positive{' and a multiple of 8' if binary else ''}, not {dim}")
        self.path = Path(vectors)
        self.paths_path = paths_file_for(self.path)
        if self.paths_path == self.path:
            raise FeatureFileError(f"{self.path}: name the vectors file something.npy, not *{PATHS_SUFFIX}")
        self.binary = binary
        self.dim = dim
        self.dtype = np.dtype(np.uint8 if binary else "<f4")
        self.width = dim // 8 if binary else dim
        self.model = dict(model or {})
        self.rows = 0
        self._tmp_vectors = _tmp_beside(self.path)
        self._tmp_paths = _tmp_beside(self.paths_path)
        self._vec_file: IO[bytes] | None = None
        self._paths_file: IO[str] | None = None
        try:
            self._vec_file = open(self._tmp_vectors, "xb")  # noqa: SIM115 (closed in close/abort)
            self._vec_file.write(_npy_header(self.dtype, 0, self.width))
            self._paths_file = open(  # noqa: SIM115
                self._tmp_paths, "x", encoding="utf-8", errors="surrogateescape", newline="\n"
            )
        except OSError as exc:
            self.abort()
            raise _oserror(self.path, exc) from None

    def write(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        """Append one batch: ``vectors[i]`` is the feature of ``paths[i]``."""
        if self._vec_file is None or self._paths_file is None:
            raise FeatureFileError(f"{self.path}: writer is closed")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(paths), self.width):
            raise ValueError(f"expected vectors of shape ({len(paths)}, {self.width}), got {vectors.shape}")
        if vectors.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} vectors, got {vectors.dtype}")
        try:
            self._vec_file.write(np.ascontiguousarray(vectors).tobytes())
            self._paths_file.write("".join(_encode_path(p) for p in paths))
        except OSError as exc:
            raise _oserror(self.path, exc) from None
        self.rows += len(paths)

    def header(self, fingerprint: str) -> dict[str, Any]:
        """The paths file's first line, as a dict."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": "binary" if self.binary else "float",
            "rows": self.rows,
            "dim": self.dim,
            "dtype": "uint8" if self.binary else "float32",
            "vectors": self.path.name,
            "model": self.model,
            "cwd": os.getcwd(),
            "fingerprint": fingerprint,
        }

    def close(self) -> None:
        """Finish both files (final row count, header, fingerprint) and rename them into place."""
        if self._vec_file is None or self._paths_file is None:
            return
        try:
            self._vec_file.seek(0)
            self._vec_file.write(_npy_header(self.dtype, self.rows, self.width))
            self._vec_file.close()
            self._paths_file.close()
            stored = np.load(self._tmp_vectors, mmap_mode="r") if self.rows else np.zeros((0, self.width), self.dtype)
            fingerprint = _fingerprint(stored)
            del stored
            final_paths = _tmp_beside(self.paths_path)
            with (
                open(final_paths, "x", encoding="utf-8", errors="surrogateescape", newline="\n") as out,
                open(self._tmp_paths, encoding="utf-8", errors="surrogateescape", newline="\n") as body,
            ):
                out.write(json.dumps(self.header(fingerprint), ensure_ascii=False) + "\n")
                while chunk := body.read(1 << 20):
                    out.write(chunk)
            os.unlink(self._tmp_paths)
            self._tmp_paths = final_paths
            os.replace(self._tmp_vectors, self.path)
            os.replace(self._tmp_paths, self.paths_path)
        except OSError as exc:
            self.abort()
            raise _oserror(self.path, exc) from None
        self._vec_file = self._paths_file = None

    def abort(self) -> None:
        """Give up: close and remove the temporary files; nothing is put in place."""
        for f in (self._vec_file, self._paths_file):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._vec_file = self._paths_file = None
        for tmp in (self._tmp_vectors, self._tmp_paths):
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class FeatureFile:
    """A feature file opened for reading: ``vectors[i]`` is the feature of ``paths[i]``.

    ``vectors`` is memory-mapped (read-only) unless :func:`read_features` was asked otherwise. ``binary``
    features are uint8 rows of packed bits (``dim`` bits each); float features are float32 rows of ``dim``.
    """

    vectors: np.ndarray
    paths: list[str]
    binary: bool
    dim: int
    header: dict[str, Any]
    vectors_path: Path
    paths_path: Path
    _rows: dict[str, int] | None = field(default=None, repr=False)
    _abs_rows: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def model(self) -> dict[str, str]:
        """The model the features came from: ``source`` (file name) and ``sha256``, as recorded."""
        return dict(self.header.get("model") or {})

    def row(self, path: str) -> int | None:
        """The row of ``path``: an exact match of a stored path first, else the same file named another way
        (relative to the folder the features were written from, ``./`` and ``..`` resolved); None if absent.
        A path stored twice gives its first row."""
        if self._rows is None:
            self._rows = {}
            for i, p in enumerate(self.paths):
                self._rows.setdefault(p, i)
        found = self._rows.get(path)
        if found is not None:
            return found
        if self._abs_rows is None:
            base = str(self.header.get("cwd") or self.paths_path.parent)
            self._abs_rows = {}
            for i, p in enumerate(self.paths):
                self._abs_rows.setdefault(os.path.normpath(os.path.join(base, p)), i)
        return self._abs_rows.get(os.path.abspath(path))


def read_features(path: PathLike, *, mmap: bool = True) -> FeatureFile:
    """Open a feature file pair, given either of its files (``vecs.npy`` or ``vecs.paths.jsonl``).

    Raises :class:`FeatureFileError` when a file is missing or unreadable, or when the two do not belong
    together (different row counts, dtype or length, or vectors from another run).
    """
    path = Path(path)
    if path.name.endswith(PATHS_SUFFIX):
        paths_path = path
        vectors_path = path.with_name(path.name[: -len(PATHS_SUFFIX)] + ".npy")
    else:
        vectors_path, paths_path = path, paths_file_for(path)
    header, paths = _read_paths_file(paths_path)
    if path == paths_path and not vectors_path.exists() and isinstance(header.get("vectors"), str):
        vectors_path = paths_path.with_name(header["vectors"])
    vectors = _read_vectors(vectors_path, mmap)

    binary = header.get("kind") == "binary"
    dim = header.get("dim")
    want_dtype = np.dtype(np.uint8 if binary else np.float32)
    pair = f"{vectors_path} and {paths_path}"
    if header.get("kind") not in ("binary", "float") or not isinstance(dim, int) or dim <= 0:
        raise FeatureFileError(f"{paths_path}: its header has no valid kind and dim")
    width = dim // 8 if binary else dim
    if vectors.ndim != 2 or vectors.dtype != want_dtype or vectors.shape[1] != width:
        raise FeatureFileError(
            f"{pair} do not belong together: {paths_path.name} describes {header['kind']} features of length "
            f"{dim} ({want_dtype}, {width} per row), {vectors_path.name} holds {vectors.dtype} {vectors.shape}"
        )
    if not (header.get("rows") == vectors.shape[0] == len(paths)):
        raise FeatureFileError(
            f"{pair} do not belong together: {vectors.shape[0]} vectors, {len(paths)} paths "
            f"(header says {header.get('rows')})"
        )
    if header.get("fingerprint") != _fingerprint(vectors):
        raise FeatureFileError(
            f"{pair} do not belong together: the vectors are not the ones written with these paths "
            "(another run's file, or edited)"
        )
    return FeatureFile(vectors, paths, binary, dim, header, vectors_path, paths_path)


def _read_paths_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            first = f.readline()
            body = f.read()
    except FileNotFoundError:
        raise FeatureFileError(
            f"{path}: no such file (the paths of the vectors' rows; `i2v features -o` writes it beside the .npy)"
        ) from None
    except OSError as exc:
        raise FeatureFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FeatureFileError(f"{path} is not an i2v features paths file (its first line is not the header)")
    if header.get("version") != FORMAT_VERSION:
        raise FeatureFileError(f"{path}: format version {header.get('version')} is not supported (expected 1)")
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        # Paths are JSON strings, which never hold a raw newline: the lines join into one JSON list.
        paths = json.loads("[" + ",".join(lines) + "]")
    except ValueError:
        paths = None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths) or len(paths) != len(lines):
        raise FeatureFileError(f"{path} is damaged: every line after the header must be one JSON string")
    return header, paths


def _read_vectors(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise FeatureFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise FeatureFileError(f"{path} is not a readable .npy array: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Rows as JSON


def feature_json(vector: np.ndarray) -> str:
    """A feature as a JSON list: float32 values in their shortest round-trip form, binary bytes as integers."""
    if vector.dtype == np.uint8:
        return "[" + ",".join(map(str, vector.tolist())) + "]"
    if np.isfinite(vector).all():
        return "[" + ",".join(map(str, vector)) + "]"  # str(np.float32) is the shortest repr that round-trips
    return json.dumps(vector.tolist())  # NaN/Infinity, as Python's json writes them


class FeatureJsonlWriter(JsonlWriter):
    """JSON lines ``{"path": ..., "feature": [...]}`` (or ``{"path": ..., "error": ...}``) to a file or stdout,
    flushed batch by batch; ``feature`` is a NumPy row, written with :func:`feature_json`."""

    def _write_one(self, record: dict[str, Any]) -> None:
        if "feature" not in record:
            super()._write_one(record)
            return
        path = json.dumps(record["path"], ensure_ascii=False)
        self.stream.write(f'{{"path": {path}, "feature": {feature_json(record["feature"])}}}\n')


def binarize(features: np.ndarray) -> np.ndarray:
    """The binary feature of ``encode1`` features: ``packbits(sigmoid(x) > 0.5)`` (that is, ``x > 0``)."""
    return np.packbits(np.asarray(features) > 0, axis=1)
