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

import binascii
import contextlib
import hashlib
import io
import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import AtomicFile, describe_oserror, resolve_target
from .errors import I2VError, OutputError, WriteError
from .store import same_weights
from .writers import JsonlWriter, Record, Sink, dumps, path_fields, record_path

PathLike = str | os.PathLike[str]

#: The ``format`` field of a paths file's header, and the version of the layout described above.
FORMAT_NAME = "i2v-features"
FORMAT_VERSION = 2
#: Versions :func:`read_features` reads (version 1 files have no digest of their paths).
READABLE_VERSIONS = (1, 2)
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
    """The paths file that goes with a vectors file: ``vecs.npy`` -> ``vecs.paths.jsonl``, beside the file a symlink
    leads to (``-o link.npy`` writes the vectors through the link: their paths must go with them, or the pair at
    the target would be split)."""
    p = Path(vectors)
    return _beside(resolve_target(p) if p.is_symlink() else p)


def _beside(vectors: Path) -> Path:
    stem = vectors.name[: -len(".npy")] if vectors.name.lower().endswith(".npy") else vectors.name
    return vectors.with_name(stem + PATHS_SUFFIX)


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
    """A path as one line of valid UTF-8 JSON: a string, or for a name that is not valid UTF-8 an object with
    its readable form and its exact bytes (``{"path": ..., "path_b64": ...}``)."""
    fields = path_fields("path", path)
    return json.dumps(fields["path"] if len(fields) == 1 else fields, ensure_ascii=False) + "\n"


def _decode_path(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        return record_path(value)
    raise ValueError("not a path")


def _paths_digest(lines: bytes) -> str:
    return "sha256:" + hashlib.sha256(lines).hexdigest()


class FeatureWriter(Sink):
    """Append feature vectors with their image paths; :meth:`close` puts ``vectors`` and its paths file in place.

    ``binary`` chooses the format of the rows: uint8 packed bits (``dim`` bits, so ``dim / 8`` bytes a row) or
    float32 (``dim`` values a row). ``model`` (``source``, ``sha256``) is recorded in the header, as is the
    working folder that relative paths start from. ``resume`` starts from the pair already at ``vectors``
    (its rows are kept; :attr:`done` holds their paths). Usable as a context manager: on an interruption it
    puts in place the rows written so far; any other exception removes its temporary files. Both files are
    written through :mod:`i2v_cli.atomic`: beside their targets, renamed into place when whole.
    """

    def __init__(
        self,
        vectors: PathLike,
        *,
        dim: int,
        binary: bool = False,
        model: dict[str, str] | None = None,
        resume: bool = False,
    ) -> None:
        if dim <= 0 or (binary and dim % 8):
            raise ValueError(f"dim must be positive{' and a multiple of 8' if binary else ''}, not {dim}")
        self.path = Path(vectors)
        self.paths_path = paths_file_for(self.path)
        if self.paths_path == self.path:
            raise FeatureFileError(f"{self.path}: name the vectors file something.npy, not *{PATHS_SUFFIX}")
        with contextlib.suppress(OSError):
            if not stat.S_ISREG(os.stat(self.paths_path).st_mode):  # it is read back to be finished: a FIFO hung
                raise FeatureFileError(f"{self.paths_path} is not a regular file: the paths file must be one")
        self.binary = binary
        self.dim = dim
        self.dtype = np.dtype(np.uint8 if binary else "<f4")
        self.width = dim // 8 if binary else dim
        self.model = dict(model or {})
        self.rows = 0
        self.done: set[str] = set()
        self._digest = hashlib.sha256()
        self._vec: AtomicFile | None = None
        self._body: AtomicFile | None = None  # the paths, gathered until the header is known; never put in place
        earlier = self._earlier() if resume else None
        try:
            self._vec = AtomicFile(self.path)
            self._body = AtomicFile(self.paths_path)
            self._vec.stream.write(_npy_header(self.dtype, 0, self.width))
            if earlier is not None:
                self._copy(earlier)
        except WriteError:
            self.abort()
            raise
        except OutputError as exc:
            self.abort()
            raise FeatureFileError(str(exc)) from None
        except OSError as exc:
            self.abort()
            raise _oserror(self.path, exc) from None

    def _earlier(self) -> FeatureFile | None:
        """The pair to resume from, checked to be of this kind, length and model."""
        if not self.path.exists() and not self.paths_path.exists():
            return None
        earlier = read_features(self.path)
        if earlier.binary != self.binary or earlier.dim != self.dim:
            kind = "binary" if earlier.binary else "float"
            raise FeatureFileError(f"cannot resume {self.path}: it holds {kind} features of length {earlier.dim}")
        if earlier.model.get("sha256") and self.model.get("sha256") and not same_weights(earlier.model, self.model):
            raise FeatureFileError(f"cannot resume {self.path}: it was made with another model ({earlier.model})")
        return earlier

    def _copy(self, earlier: FeatureFile) -> None:
        step = max(1, (8 << 20) // max(1, earlier.vectors.strides[0]))
        for start in range(0, len(earlier), step):
            self._put(earlier.paths[start : start + step], np.asarray(earlier.vectors[start : start + step]))
        self.done = set(earlier.paths)
        del earlier

    def write(self, records: Iterable[Record]) -> None:
        """Append the records that have a ``feature`` (rows of this writer's dtype); error records get no row."""
        ok = [r for r in records if "feature" in r]
        if ok:
            self.append([r["path"] for r in ok], np.stack([r["feature"] for r in ok]))

    def append(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        """Append one batch: ``vectors[i]`` is the feature of ``paths[i]``."""
        if self._vec is None or self._body is None:
            raise FeatureFileError(f"{self.path}: writer is closed")
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape != (len(paths), self.width):
            raise ValueError(f"expected vectors of shape ({len(paths)}, {self.width}), got {vectors.shape}")
        if vectors.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} vectors, got {vectors.dtype}")
        try:
            self._put(paths, vectors)
        except OSError as exc:
            raise _oserror(self.path, exc) from None

    def _put(self, paths: Sequence[str], vectors: np.ndarray) -> None:
        assert self._vec is not None and self._body is not None
        lines = "".join(_encode_path(p) for p in paths).encode("utf-8")
        self._vec.stream.write(np.ascontiguousarray(vectors, dtype=self.dtype).tobytes())
        self._body.stream.write(lines)
        self._digest.update(lines)
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
            **path_fields("vectors", resolve_target(self.path).name),  # not UTF-8: shown, plus its exact bytes
            "model": self.model,
            **path_fields("cwd", os.getcwd()),
            "fingerprint": fingerprint,
            "paths_digest": "sha256:" + self._digest.hexdigest(),
        }

    def close(self) -> None:
        """Finish both files (final row count, header, fingerprints) and rename them into place."""
        if self._vec is None or self._body is None:
            return
        vec, body = self._vec, self._body
        try:
            vec.stream.seek(0)
            vec.stream.write(_npy_header(self.dtype, self.rows, self.width))
            vec.stream.flush()
            # A special target (/dev/null) cannot be read back: its fingerprint is of no rows.
            stored = np.load(vec.tmp, mmap_mode="r") if self.rows and vec.tmp else np.zeros((0, self.width), self.dtype)
            fingerprint = _fingerprint(stored)
            del stored
            body.stream.flush()
            final = AtomicFile(self.paths_path)
            try:
                final.stream.write((json.dumps(self.header(fingerprint), ensure_ascii=False) + "\n").encode())
                with open(body.tmp or self.paths_path, "rb") as lines:
                    while chunk := lines.read(1 << 20):
                        final.stream.write(chunk)
            except BaseException:
                final.discard()
                raise
            vec.commit()
            final.commit()
        except WriteError:
            self.abort()
            raise
        except OutputError as exc:
            self.abort()
            raise FeatureFileError(str(exc)) from None
        except OSError as exc:
            self.abort()
            raise _oserror(self.path, exc) from None
        finally:
            body.discard()
        self._vec = self._body = None

    def abort(self) -> None:
        """Give up: close and remove the temporary files; nothing is put in place."""
        for f in (self._vec, self._body):
            if f is not None:
                f.discard()
        self._vec = self._body = None


def _oserror(path: Path, exc: OSError) -> WriteError:
    """A write the system refused (a full disk, an I/O error): exit 3, as every output's."""
    return WriteError(describe_oserror(path, exc))


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
    _abs_rows: dict[tuple[int, int], int] | None = field(default=None, repr=False)
    _texts: dict[str, int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def model(self) -> dict[str, str]:
        """The model the features came from: ``source`` (file name) and ``sha256``, as recorded."""
        return dict(self.header.get("model") or {})

    @property
    def base(self) -> str:
        """The folder stored relative paths are relative to: the one the features were written from (its exact
        name, also when not UTF-8), else the paths file's own folder."""
        return _header_path(self.header, "cwd") or str(self.paths_path.parent)

    def row(self, path: str) -> int | None:
        """The row of the indexed file that ``path`` names, or None. Stored relative paths are taken from the
        folder the features were written from (:attr:`base`, not from where this runs); the same file named another
        way (a symlink, a hard link, a path through a symlinked folder) matches too, by device and inode. A path
        that names no file from here is looked up as stored text. A file stored twice gives its first row."""
        base = self.base
        if self._rows is None:
            self._rows = {}
            for i, p in enumerate(self.paths):
                self._rows.setdefault(os.path.normpath(os.path.join(base, p)), i)
        found = self._rows.get(os.path.normpath(os.path.abspath(path)))
        if found is not None:
            return found
        key = _file_key(path)
        if key is None:  # no such file from here: the path as stored (the text an earlier listing showed)
            if self._texts is None:
                self._texts = {}
                for i, p in enumerate(self.paths):
                    self._texts.setdefault(p, i)
            return self._texts.get(path)
        if self._abs_rows is None:  # one stat per stored path: only when a query is named another way
            self._abs_rows = {}
            for absolute, i in self._rows.items():
                stored = _file_key(absolute)
                if stored is not None:
                    self._abs_rows.setdefault(stored, i)
        return self._abs_rows.get(key)


def _file_key(path: str) -> tuple[int, int] | None:
    """What identifies a file whatever it is called: (device, inode)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _header_path(header: dict[str, Any], key: str) -> str:
    """A file name the paths file's header holds (exact, also when not UTF-8), or "" when it holds none."""
    try:
        value = record_path(header, key)
    except (KeyError, ValueError, binascii.Error):
        return ""
    return value if isinstance(value, str) else ""


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
        beside_link = _beside(path)
        if not paths_path.exists() and beside_link.exists():  # written through the link by i2v before 2026-11-28
            paths_path = beside_link
    if path != paths_path and not vectors_path.exists():
        raise FeatureFileError(f"{vectors_path}: no such file (write one with `i2v features IMAGES -o {vectors_path}`)")
    header, paths = _read_paths_file(paths_path)
    named = _header_path(header, "vectors")
    if path == paths_path and not vectors_path.exists() and named:
        vectors_path = paths_path.with_name(named)
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
        with open(path, "rb") as f:
            first = f.readline()
            raw_body = f.read()
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
    if header.get("version") not in READABLE_VERSIONS:
        raise FeatureFileError(
            f"{path}: format version {header.get('version')} is not supported (this i2v reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}): write it again with this i2v"
        )
    damaged = f"{path} is damaged: every line after the header must be one JSON path"
    if header.get("version", 1) >= 2 and header.get("paths_digest") != _paths_digest(raw_body):
        raise FeatureFileError(
            f"{path} was changed after it was written (its lines are not the ones recorded): the rows would name "
            "the wrong images; write the features again"
        )
    try:
        body = raw_body.decode("utf-8", "strict" if header.get("version", 1) >= 2 else "surrogateescape")
    except UnicodeDecodeError:
        raise FeatureFileError(damaged) from None
    lines = body.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    try:
        # Paths are JSON values, which never hold a raw newline: the lines join into one JSON list.
        paths = [_decode_path(p) for p in json.loads("[" + ",".join(lines) + "]")]
    except (ValueError, TypeError, binascii.Error):
        raise FeatureFileError(damaged) from None
    if len(paths) != len(lines):
        raise FeatureFileError(damaged)
    return header, paths


def _read_vectors(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise FeatureFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise FeatureFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if f.read(6) != _NPY_MAGIC[:6]:  # numpy's own word for it: "pickled data"
                raise FeatureFileError(f"{path} is not a .npy array (NumPy's header is missing)") from None
        raise FeatureFileError(f"{path} is not a readable .npy array: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Rows as JSON


def feature_json(vector: np.ndarray) -> str:
    """A feature as a JSON list: float32 values in their shortest round-trip form, binary bytes as integers.
    Raises ValueError for NaN or infinity, which JSON cannot hold (the mapper never lets them through)."""
    if vector.dtype == np.uint8:
        return "[" + ",".join(map(str, vector.tolist())) + "]"
    if not np.isfinite(vector).all():
        raise ValueError("a feature holds NaN or infinity")
    return "[" + ",".join(vector.astype(str)) + "]"  # float32 to str: the shortest repr that round-trips


def record_json(record: Record) -> str:
    """A record as one JSON object: of ``i2v features``, ``{"path": ..., "feature": [...]}`` (the path's exact bytes
    as :func:`~i2v_cli.writers.path_fields` gives them, the feature by :func:`feature_json`); any other (a tag
    record, an error) as :func:`~i2v_cli.writers.dumps` writes it. The one formatter of the features JSONL writer
    and the server."""
    if "feature" not in record:
        return dumps(record)
    head = json.dumps(path_fields("path", record["path"]), ensure_ascii=False)[:-1]
    return f'{head}, "feature": {feature_json(record["feature"])}}}'


class FeatureJsonlWriter(JsonlWriter):
    """JSON lines ``{"path": ..., "feature": [...]}`` (or ``{"path": ..., "error": ...}``) to a file or stdout,
    flushed batch by batch (:func:`record_json`)."""

    def _format(self, record: Record, buf: io.StringIO) -> None:
        buf.write(record_json(record) + "\n")


def binarize(features: np.ndarray) -> np.ndarray:
    """The binary feature of ``encode1`` features: ``packbits(sigmoid(x) > 0.5)`` (that is, ``x > 0``)."""
    return np.packbits(np.asarray(features) > 0, axis=1)
