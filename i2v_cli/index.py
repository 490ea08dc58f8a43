"""A collection as one SQLite file: every image's exact path, size, mtime, content hash, pixel size, all 1,539
tag scores, its semantic feature and binary code; kept current by incremental runs.

The file is a plain SQLite database (any ``sqlite3``, datasette or pandas reads it; the README documents the
tables). SQLite is its own atomic writer (journal, fsync), so this is the one file i2v writes that does not go
through :mod:`i2v_cli.atomic`: a run commits a batch at a time in WAL mode, so a killed run keeps what it
committed and readers (``i2v search``) work while a run writes.

An update (:func:`update`) is planned before any network runs (:func:`plan_update`):

- a file whose path, size and mtime are those of its row is unchanged (not read again), unless its row holds an
  error: that file is computed again (made readable since, say), and counts as failed again if it still fails;
- a new or changed file is hashed (SHA-256 of its bytes); when a row with that hash has results, the results
  are copied (a moved or renamed file takes over its old row when the old path is gone; a copy gets a new row):
  no network run;
- the rest go through :func:`i2v_cli.pipeline.run_job` (both networks on each decoded batch) into
  :class:`IndexSink`, which commits each batch;
- rows whose file no longer exists are removed.

Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import CATEGORIES, NUM_TAGS
from .errors import OutputError, WriteError
from .features import binarize
from .hashing import sha256_file
from .sketch import DIMS as SKETCH_DIMS
from .sketch import SEED as SKETCH_SEED
from .sketch import make_basis, sketch
from .store import how_weights_differ, same_weights
from .writers import Record, Sink, display

if TYPE_CHECKING:  # torch is imported only where a network runs: searches start fast
    import torch

#: Recorded as ``PRAGMA user_version``; a file with another version is refused with a clear message.
SCHEMA_VERSION = 2
#: Older versions this i2v still reads; opening one to write upgrades it in place (version 1 lacks the sketches).
READABLE_VERSIONS = (1, 2)
#: ``PRAGMA application_id`` of an i2v index ("i2vX"), so another program's SQLite file is never taken for one.
APPLICATION_ID = 0x69327658
#: Scores at or above this go into ``tag_scores`` (indexed by tag and score) too; a query bound below it reads the
#: ``scores`` BLOBs instead (correct, but a scan of the whole table).
TAG_FLOOR = 0.05
#: Rows a network batch commits at a time are the run's batches; metadata-only changes commit this many at once.
COMMIT_ROWS = 2000
_RATING = next(c for c in CATEGORIES if c.name == "rating")

#: Images a row of ``sketch_blocks`` holds: the ids ``block * 1024`` to ``block * 1024 + 1023``. Reading a million
#: sketches is then a thousand rows (a fraction of a second) instead of a million (seconds of per-row overhead).
SKETCH_BLOCK_SHIFT = 10

#: What version 2 added to version 1 (an upgrade runs exactly this).
V2_SCHEMA = """
CREATE TABLE sketch_blocks (
    block    INTEGER PRIMARY KEY,
    ids      BLOB NOT NULL,
    sketches BLOB NOT NULL
);
CREATE TABLE sketch_basis (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    seed  INTEGER NOT NULL,
    basis BLOB NOT NULL
);
CREATE INDEX images_rating ON images (rating);
"""

SCHEMA = (
    """
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE images (
    id         INTEGER PRIMARY KEY,
    path       BLOB NOT NULL UNIQUE,
    path_text  TEXT NOT NULL,
    size       INTEGER NOT NULL,
    mtime_ns   INTEGER NOT NULL,
    sha256     BLOB NOT NULL,
    width      INTEGER,
    height     INTEGER,
    format     TEXT,
    error      TEXT,
    rating     TEXT,
    scores     BLOB,
    feature    BLOB,
    code       BLOB,
    indexed_at REAL NOT NULL
);
CREATE INDEX images_sha256 ON images (sha256);
CREATE TABLE tag_scores (
    tag   INTEGER NOT NULL,
    score REAL NOT NULL,
    image INTEGER NOT NULL,
    PRIMARY KEY (tag, score, image)
) WITHOUT ROWID;
"""
    + V2_SCHEMA
)


#: SQLite's result codes for a full disk, and for a damaged file (SQLITE_CORRUPT, SQLITE_NOTADB).
_SQLITE_FULL = 13
_DAMAGE_CODES = (11, 26)


class IndexDbError(OutputError):
    """An index file that cannot be opened or used: not an i2v index, another schema version, other models."""


class DamagedIndexError(IndexDbError):
    """A value stored in the index that i2v did not write so: a BLOB of the wrong length or type (a hand edit,
    another tool, a damaged disk), or a file whose pages SQLite finds damaged."""


def _damaged(what: str, detail: str) -> DamagedIndexError:
    """The one message for damage, whatever was damaged."""
    return DamagedIndexError(
        f"the index holds a damaged {what} ({detail}): it was changed by something other than i2v; index the "
        "folders again into a new --db"
    )


def stored(blob: object, what: str, length: int | None = None, dtype: str = "<f4", width: int = 0) -> np.ndarray:
    """The array a BLOB of the index holds, checked: ``length`` values when given, else a whole number of them
    (of rows of ``width`` when given, reshaped so). Anything else raises :class:`DamagedIndexError`, one line
    for the user instead of numpy's ``ValueError`` from wherever the BLOB was read."""
    if not isinstance(blob, bytes):
        raise _damaged(what, f"a {type(blob).__name__}, not a BLOB")
    size = np.dtype(dtype).itemsize
    count, rest = divmod(len(blob), size)
    if rest or (length is not None and count != length) or (width and count % width):
        want = f"{length:,} values" if length is not None else f"rows of {width:,} values" if width else "whole values"
        raise _damaged(what, f"{len(blob):,} bytes, not {want} of {size} bytes")
    array = np.frombuffer(blob, dtype)
    return array.reshape(-1, width) if width else array


def stored_name(value: object, what: str = "path") -> str:
    """A path stored in the index (a BLOB of its bytes) as ``os`` takes it; anything else is damage."""
    if not isinstance(value, bytes):
        raise _damaged(what, f"a {type(value).__name__}, not a BLOB")
    return os.fsdecode(value)


def _damaged_meta(key: str, value: str) -> DamagedIndexError:
    return _damaged(f"{key} record", repr(value[:60]))


def stored_rows(blobs: Sequence[object], what: str, width: int | None) -> np.ndarray:
    """BLOBs of ``width`` float32 values each (every one the same length as the first when ``width`` is None),
    as one (len(blobs), width) array: :func:`stored` for a chunk of rows, at the cost of one join."""
    if width is None:
        width = len(stored(blobs[0], what)) if blobs else 0
    for blob in blobs:
        if not isinstance(blob, bytes) or len(blob) != 4 * width:
            stored(blob, what, width)
    return np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), width)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FileState:
    """What the index knows of a file without running a network: exact path, size, mtime, content hash, pixels."""

    path: str
    size: int
    mtime_ns: int
    sha256: bytes = b""
    width: int | None = None
    height: int | None = None
    format: str | None = None


def _on_read_only_media(path: str) -> bool:
    """Whether ``path``'s file system is mounted read-only (not merely a folder this user cannot write, which
    another may be writing)."""
    try:
        return bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _wal_pending(path: str) -> bool:
    """Whether a non-empty write-ahead log lies beside the index: committed changes that an immutable read would
    skip (it read rows since deleted, and missed rows since added)."""
    try:
        return os.path.getsize(path + "-wal") > 0
    except OSError:
        return False


def fs_path(path: str) -> bytes:
    """The exact bytes of a path (as stored in ``images.path``)."""
    return os.fsencode(path)


def file_sha256(path: str) -> bytes:
    """SHA-256 of a file's bytes (raises OSError)."""
    return sha256_file(path)


def not_a_file(path: str, st: os.stat_result) -> str | None:
    """Why ``path`` (stat ``st``) cannot be indexed before it is read, or None for a regular file: a FIFO would
    block its hashing for ever, and a device would be read whole."""
    if stat.S_ISREG(st.st_mode):
        return None
    what = "a folder" if stat.S_ISDIR(st.st_mode) else "a device, pipe or socket"
    return f"{display(path)}: not a regular file ({what}), not an image"


def probe(path: str, st: os.stat_result, sha256: bytes | None = None) -> FileState:
    """A file's state: hash (computed unless given) and pixel size and format from its header (None when the
    header cannot be read: the decoding stage then records why)."""
    from PIL import Image, UnidentifiedImageError

    digest = sha256 if sha256 is not None else file_sha256(path)
    width = height = fmt = None
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        pass
    return FileState(path, st.st_size, st.st_mtime_ns, digest, width, height, fmt)


def top_rating(scores: np.ndarray) -> str:
    """The rating with the highest score (``rating:safe`` means safe is the highest)."""
    from .tags import load_tag_list

    names = load_tag_list()[_RATING.start : _RATING.stop]
    return names[int(np.argmax(scores[_RATING.start : _RATING.stop]))]


# --------------------------------------------------------------------------------------------------------------
# The file


class Index:
    """An open index file. ``create`` makes a new one when the file does not exist; ``readonly`` never writes."""

    def __init__(self, path: str, *, create: bool = False, readonly: bool = False) -> None:
        self.path = path
        self._basis: np.ndarray | None = None
        #: Sketch changes of the open transaction, written at its commit: row id -> its feature (None: drop).
        self._pending: dict[int, np.ndarray | None] = {}
        self._held = False  # copy_results reads temp.held_results (see held_results)
        shown = display(path)
        exists = os.path.exists(path)
        if not exists and not create:
            raise IndexDbError(f"{shown}: no such index (make one with `i2v index FOLDER --db {shown}`)")
        if os.path.isdir(path):
            raise IndexDbError(f"--db {shown} is a folder: name a file")
        if exists and not os.path.isfile(path):  # SQLite's open of a FIFO waits for a writer for ever
            raise IndexDbError(f"--db {shown} is not a regular file (a device, pipe or socket): name an index file")
        try:
            try:
                version, app, tables = self._connect("?mode=ro" if readonly else "")
            except sqlite3.OperationalError:
                if not (readonly and exists and _on_read_only_media(path)):
                    raise
                if _wal_pending(path):
                    raise IndexDbError(
                        f"cannot read the index {shown} on read-only media: its write-ahead log ({shown}-wal) holds "
                        "changes that only a writable copy can apply; copy the index and its -wal file somewhere "
                        "writable and open it there once"
                    ) from None
                # SQLite cannot make the index's shared-memory file (-shm) on read-only media, and nothing can write
                # there either: the file is read as it is, without locks.
                version, app, tables = self._connect("?mode=ro&immutable=1")
        except sqlite3.OperationalError as exc:
            raise IndexDbError(f"cannot open the index {shown} ({exc})") from None
        except sqlite3.DatabaseError as exc:
            raise IndexDbError(f"{shown} is not an i2v index ({exc})") from None
        if tables == 0 and not readonly:
            self._create(made_here=not exists)
        elif app != APPLICATION_ID:
            self.conn.close()
            raise IndexDbError(f"{shown} is an SQLite file, but not an i2v index: choose another --db")
        elif version not in READABLE_VERSIONS:
            self.conn.close()
            raise IndexDbError(
                f"{shown} is an i2v index of schema version {version}; this i2v reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}: index the images again into a new file"
            )
        try:
            self._meta = dict(self.conn.execute("SELECT key, value FROM meta"))
            self._tags: list[str] | None = None
            self.version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if self.version < SCHEMA_VERSION and not readonly:
                self._upgrade()
        except sqlite3.Error as exc:
            self.conn.close()
            raise damaged(path, exc) or IndexDbError(f"cannot read the index {shown} ({exc})") from None

    def _connect(self, query: str) -> tuple[int, int, int]:
        """Open ``self.path`` with the URI ``query``: its schema version, application id and number of tables."""
        self.conn = sqlite3.connect("file:" + _uri_path(self.path) + query, uri=True, isolation_level=None,
                                    check_same_thread=False)  # fmt: skip
        try:
            self.conn.execute("PRAGMA busy_timeout = 10000")
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            app = self.conn.execute("PRAGMA application_id").fetchone()[0]
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError:
            self.conn.close()
            raise
        return version, app, tables

    def _create(self, made_here: bool = False) -> None:
        """Make the tables of a new index. When that fails (a full disk), a file this run ``made_here`` is removed,
        with SQLite's files beside it: left empty, it was refused later as "not an i2v index"."""
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            with self.transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self.conn.execute("INSERT INTO meta VALUES ('format', 'i2v-index'), ('tag_floor', ?)", (TAG_FLOOR,))
        except sqlite3.Error as exc:
            self.conn.close()
            if made_here:
                for leftover in (self.path, *(self.path + end for end in ("-wal", "-shm", "-journal"))):
                    with contextlib.suppress(OSError):
                        os.unlink(leftover)
            full = getattr(exc, "sqlite_errorcode", None) == _SQLITE_FULL or "disk is full" in str(exc)
            message = f"cannot create the index {display(self.path)}: {exc}"
            if full:
                raise WriteError(message + " (free some space, or write elsewhere)") from None
            raise IndexDbError(message) from None

    def _upgrade(self) -> None:
        """Version 1 to 2: add the sketch tables and sketch every stored feature (one transaction: a killed
        upgrade leaves version 1 as it was)."""
        try:
            self._upgrade_in_place()
        except OutputError as exc:
            self.conn.close()
            raise IndexDbError(
                f"{exc} (upgrading it from schema version {self.version} to {SCHEMA_VERSION}, which `i2v index` "
                "does before writing; searches read it as it is)"
            ) from None
        self.version = SCHEMA_VERSION

    def _upgrade_in_place(self) -> None:
        with self.transaction():
            if self.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # another process upgraded it since this one read the version
            for statement in V2_SCHEMA.split(";"):
                if statement.strip():
                    self.conn.execute(statement)
            if self.feature_dim is not None:
                cursor = self.conn.execute("SELECT id, feature FROM images WHERE feature IS NOT NULL ORDER BY id")
                for chunk in iter_chunks(cursor, 4096):
                    for row, blob in chunk:
                        self._pending[row] = stored(blob, "feature", self.feature_dim)
                    self._flush_sketches()
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _flush_sketches(self) -> None:
        """Write the transaction's sketch changes: one read-modify-write of each block they touch."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        rows = np.array(sorted(pending), np.int64)
        kept = [r for r in rows.tolist() if pending[r] is not None]
        new_ids = np.array(kept, np.int64)
        sketches = np.empty((0, SKETCH_DIMS), np.float16)
        if kept:
            feats = np.stack([pending[r] for r in kept])  # type: ignore[misc]
            sketches = sketch(feats, self._make_basis(feats.shape[1]))
        for block in np.unique(rows >> SKETCH_BLOCK_SHIFT).tolist():
            old = self.conn.execute("SELECT ids, sketches FROM sketch_blocks WHERE block = ?", (block,)).fetchone()
            ids = np.empty(0, np.int64) if old is None else stored(old[0], "sketch block", dtype="<i8")
            vecs = np.empty((0, SKETCH_DIMS), np.float16)
            if old is not None:
                vecs = stored(old[1], "sketch block", len(ids) * SKETCH_DIMS, "<f2", SKETCH_DIMS)
            keep = ~np.isin(ids, rows[(rows >> SKETCH_BLOCK_SHIFT) == block])
            mine = (new_ids >> SKETCH_BLOCK_SHIFT) == block
            ids = np.concatenate([ids[keep], new_ids[mine]])
            vecs = np.concatenate([vecs[keep], sketches[mine]])
            order = np.argsort(ids, kind="stable")
            if len(ids):
                self.conn.execute(
                    "INSERT OR REPLACE INTO sketch_blocks VALUES (?, ?, ?)",
                    (block, ids[order].astype("<i8").tobytes(), vecs[order].astype("<f2").tobytes()),
                )
            else:
                self.conn.execute("DELETE FROM sketch_blocks WHERE block = ?", (block,))

    def sketch_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored sketch, a block at a time: (row ids ascending, sketches: N x sketch.DIMS float16). Inside a
        transaction its own rows' sketches are written first, so it reads its own writes as SQLite's reads do."""
        self._flush_sketches()
        for ids, vecs in self.conn.execute("SELECT ids, sketches FROM sketch_blocks ORDER BY block"):
            rows = stored(ids, "sketch block", dtype="<i8")
            yield rows, stored(vecs, "sketch block", len(rows) * SKETCH_DIMS, "<f2", SKETCH_DIMS)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: object) -> None:
        self.close()
        if isinstance(exc, sqlite3.Error) and (message := damaged(self.path, exc)) is not None:
            raise message from None  # a damaged file met midway (a search, dupes, an export): one line, not a traceback

    # ---- transactions and metadata

    def transaction(self) -> _Transaction:
        """``with index.transaction():`` one write transaction (BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error)."""
        return _Transaction(self)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """``with index.snapshot():`` every read inside sees the index as one commit left it, whatever another
        process commits meanwhile (a read transaction: in WAL mode the writer goes on). A search that reads ids
        in one statement and their features or paths in the next needs it; inside a transaction it does nothing."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN")
        try:
            yield
        finally:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
        self._meta[key] = value

    @property
    def tags(self) -> list[str]:
        """The tag list of the stored scores (the columns of each ``scores`` BLOB, in order)."""
        if self._tags is None:
            stored = self.meta("tags")
            if stored is None:
                from .tags import load_tag_list

                self._tags = load_tag_list()
            else:
                try:
                    tags = json.loads(stored)
                except ValueError:
                    tags = None
                if not isinstance(tags, list) or len(tags) != NUM_TAGS or not all(isinstance(t, str) for t in tags):
                    raise _damaged_meta("tags", stored)
                self._tags = tags
        return self._tags

    @property
    def basis(self) -> np.ndarray | None:
        """The index's sketch basis (feature_dim x sketch.DIMS; stored as float32, held as float64), or None
        before any feature is stored or in a version-1 file opened read-only."""
        if self._basis is None and self.version >= 2:
            row = self.conn.execute("SELECT basis FROM sketch_basis WHERE id = 1").fetchone()
            if row is not None:
                self._basis = stored(row[0], "sketch basis", width=SKETCH_DIMS).astype(np.float64)
        return self._basis

    def _make_basis(self, dim: int) -> np.ndarray:
        """Draw and store the basis (inside a transaction), once."""
        existing = self.basis
        if existing is not None:
            return existing
        basis = make_basis(dim, SKETCH_DIMS, SKETCH_SEED)
        self.conn.execute("INSERT INTO sketch_basis VALUES (1, ?, ?)", (SKETCH_SEED, basis.astype("<f4").tobytes()))
        self._basis = basis.astype(np.float64)
        return self._basis

    @property
    def feature_dim(self) -> int | None:
        dim = self.meta("feature_dim")
        if dim is None:
            return None
        if not dim.isdigit() or int(dim) == 0:
            raise _damaged_meta("feature_dim", dim)
        return int(dim)

    def model_record(self, key: str) -> dict[str, Any]:
        """The ``tag_model`` or ``feature_model`` record of the first run (empty before one)."""
        stored_value = self.meta(key)
        if stored_value is None:
            return {}
        try:
            model = json.loads(stored_value)
        except ValueError:
            model = None
        if not isinstance(model, dict):
            raise _damaged_meta(key, stored_value)
        return model

    def check_models(self, tag_model: dict[str, str], feature_model: dict[str, str], feature_dim: int) -> None:
        """Record the models of the first run; refuse others later (scores and vectors of two models never mix)."""
        for key, model in (("tag_model", tag_model), ("feature_model", feature_model)):
            if self.meta(key) is None:
                continue
            old = self.model_record(key)
            if not same_weights(old, model):
                raise IndexDbError(
                    f"{display(self.path)} was indexed with the {key.replace('_', ' ')} {old.get('source')} "
                    f"(sha256 {str(old.get('sha256'))[:12]}), not {model.get('source')} "
                    f"({how_weights_differ(old, model)}): use the same weights, or another --db"
                )
        if self.meta("tag_model") is None:
            from .tags import load_tag_list

            with self.transaction():
                self.set_meta("tag_model", json.dumps(tag_model))
                self.set_meta("feature_model", json.dumps(feature_model))
                self.set_meta("feature_dim", str(feature_dim))
                self.set_meta("tags", json.dumps(load_tag_list(), ensure_ascii=False))
                self._tags = None

    # ---- reading

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM images").fetchone()[0]

    def known(self) -> dict[bytes, tuple[int, int, int, bytes, bool]]:
        """Every row's ``path -> (id, size, mtime_ns, sha256, failed)``; ``failed``: the row holds an error."""
        rows = self.conn.execute("SELECT path, id, size, mtime_ns, sha256, error IS NOT NULL FROM images")
        known = {}
        for p, i, s, m, h, f in rows:
            if not isinstance(p, bytes):
                stored_name(p)  # raises: the path is damaged
            if not isinstance(h, bytes):
                stored_name(h, "content hash")
            known[p] = (i, s, m, h, bool(f))
        return known

    def with_results(self, sha256: bytes) -> int | None:
        """A row holding results (not an error) for this content, or None."""
        row = self.conn.execute(
            "SELECT id FROM images WHERE sha256 = ? AND error IS NULL ORDER BY id LIMIT 1", (sha256,)
        ).fetchone()
        return None if row is None else row[0]

    def row_id(self, path: str) -> int | None:
        row = self.conn.execute("SELECT id FROM images WHERE path = ?", (fs_path(path),)).fetchone()
        return None if row is None else row[0]

    def scores(self, row: int) -> np.ndarray | None:
        (blob,) = self.conn.execute("SELECT scores FROM images WHERE id = ?", (row,)).fetchone() or (None,)
        return None if blob is None else stored(blob, "score vector", NUM_TAGS)

    def feature_rows(self, rows: Sequence[int]) -> Iterator[list[tuple[int, bytes]]]:
        """``(id, feature BLOB)`` of these row ids (those that have a feature), 900 at a time (SQLite's limit on
        the parameters of one statement is 999 in older builds)."""
        for start in range(0, len(rows), 900):
            part = [int(r) for r in rows[start : start + 900]]
            marks = ", ".join("?" * len(part))
            yield self.conn.execute(
                f"SELECT id, feature FROM images WHERE id IN ({marks}) AND feature IS NOT NULL", part
            ).fetchall()

    def feature(self, row: int) -> np.ndarray | None:
        (blob,) = self.conn.execute("SELECT feature FROM images WHERE id = ?", (row,)).fetchone() or (None,)
        return None if blob is None else stored(blob, "feature", self.feature_dim)

    # ---- writing (inside a transaction)

    def put(self, state: FileState, scores: np.ndarray | None, feature: np.ndarray | None, error: str | None) -> None:
        """Insert or replace the row of ``state.path`` with these results (or this error, kept as valid UTF-8: it
        names the file, whose name may not be)."""
        key = fs_path(state.path)
        error = None if error is None else display(error)
        old = self.conn.execute("SELECT id, scores FROM images WHERE path = ?", (key,)).fetchone()
        if old is not None:
            self._drop_tag_scores(old[0], old[1])
        blobs: tuple[Any, ...] = (None, None, None, None)
        if scores is not None and feature is not None:
            scores = np.ascontiguousarray(scores, dtype="<f4")
            feature = np.ascontiguousarray(feature, dtype="<f4")
            code = binarize(feature[None, :])[0]
            blobs = (top_rating(scores), scores.tobytes(), feature.tobytes(), code.tobytes())
        values = (state.size, state.mtime_ns, state.sha256, state.width, state.height, state.format, error, *blobs,
                  time.time())  # fmt: skip
        if old is None:
            cur = self.conn.execute(
                "INSERT INTO images (path, path_text, size, mtime_ns, sha256, width, height, format, error, rating, "
                "scores, feature, code, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, display(state.path), *values),
            )
            row = cur.lastrowid
        else:
            row = old[0]
            self.conn.execute(
                "UPDATE images SET size = ?, mtime_ns = ?, sha256 = ?, width = ?, height = ?, format = ?, error = ?, "
                "rating = ?, scores = ?, feature = ?, code = ?, indexed_at = ? WHERE id = ?",
                (*values, row),
            )
        if scores is not None:
            self._add_tag_scores(row, scores)
        if blobs[2] is not None:  # a sketch exactly for the rows whose feature is stored (both results, no error)
            self._pending[row] = feature.copy()  # type: ignore[union-attr]
        elif old is not None:
            self._pending[row] = None
        self._flush_outside_transaction()

    def _flush_outside_transaction(self) -> None:
        """A caller writing without :meth:`transaction` (each statement its own commit) gets its sketch written
        at once rather than never."""
        if not self.conn.in_transaction:
            self._flush_sketches()

    def copy_results(self, source: int, state: FileState) -> None:
        """Give ``state.path`` the results of row ``source`` (same content): no network run. Within
        :meth:`held_results`, the source's results as they were when it began."""
        table = "temp.held_results" if self._held else "images"
        scores, feature = self.conn.execute(f"SELECT scores, feature FROM {table} WHERE id = ?", (source,)).fetchone()
        self.put(state, stored(scores, "score vector", NUM_TAGS), stored(feature, "feature", self.feature_dim), None)

    @contextlib.contextmanager
    def held_results(self, rows: Iterable[int]) -> Iterator[None]:
        """``with index.held_results(sources):`` :meth:`copy_results` reads these rows' results as they are now,
        whatever the copies inside change: when files swap names (or shift, 1 to 2 and 2 to 3), a row is the source
        of one copy and the target of another, and copied in turn, it gave one image's results to both. Held in a
        temporary table (on disk when large: a collection renumbered whole costs no memory)."""
        ids = sorted(set(rows))
        if not ids:
            yield
            return
        self.conn.execute("CREATE TEMP TABLE held_results (id INTEGER PRIMARY KEY, scores BLOB, feature BLOB)")
        try:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                self.conn.execute(
                    "INSERT INTO temp.held_results SELECT id, scores, feature FROM images "
                    f"WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
            self._held = True
            yield
        finally:
            self._held = False
            self.conn.execute("DROP TABLE temp.held_results")

    def move(self, row: int, state: FileState) -> None:
        """Row ``row``'s file is now at ``state.path`` (a move or rename, recognised by its hash)."""
        self.conn.execute(
            "UPDATE images SET path = ?, path_text = ?, size = ?, mtime_ns = ? WHERE id = ?",
            (fs_path(state.path), display(state.path), state.size, state.mtime_ns, row),
        )

    def touch(self, row: int, state: FileState) -> None:
        """A file whose mtime changed but whose content did not: only its size and mtime are updated."""
        self.conn.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE id = ?", (state.size, state.mtime_ns, row))

    def remove(self, row: int) -> None:
        old = self.conn.execute("SELECT scores FROM images WHERE id = ?", (row,)).fetchone()
        if old is not None:
            self._drop_tag_scores(row, old[0])
            self.conn.execute("DELETE FROM images WHERE id = ?", (row,))
            self._pending[row] = None
            self._flush_outside_transaction()

    def _add_tag_scores(self, row: int, scores: np.ndarray) -> None:
        cols = np.flatnonzero(scores >= TAG_FLOOR)
        self.conn.executemany(
            "INSERT INTO tag_scores VALUES (?, ?, ?)", [(int(c), float(scores[c]), row) for c in cols]
        )

    def _drop_tag_scores(self, row: int, blob: bytes | None) -> None:
        if blob is None:
            return
        scores = stored(blob, "score vector", NUM_TAGS)
        cols = np.flatnonzero(scores >= TAG_FLOOR)
        self.conn.executemany(
            "DELETE FROM tag_scores WHERE tag = ? AND score = ? AND image = ?",
            [(int(c), float(scores[c]), row) for c in cols],
        )


def damaged(path: str, exc: sqlite3.Error) -> DamagedIndexError | None:
    """The message for an index file SQLite finds damaged ("database disk image is malformed", "file is not a
    database"), or None for any other error."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11 on; before, the message says it
    if code is not None and code & 0xFF not in _DAMAGE_CODES:
        return None
    if code is None and not (
        type(exc) is sqlite3.DatabaseError and ("malformed" in str(exc) or "not a database" in str(exc))
    ):
        return None
    return DamagedIndexError(
        f"the index {display(path)} is damaged ({exc}): restore it from a backup, or index the folders again into a "
        "new --db"
    )


def _uri_path(path: str) -> str:
    from urllib.parse import quote

    return quote(os.fsencode(os.path.abspath(path)))


class _Transaction:
    def __init__(self, index: Index) -> None:
        self.index = index

    def __enter__(self) -> None:
        try:
            self.index.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise IndexDbError(f"cannot write the index {display(self.index.path)}: {exc}") from None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, *_: object) -> None:
        conn = self.index.conn
        if exc_type is not None:
            self.index._pending.clear()
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):  # a read-only file or folder, a full disk: a message, not a traceback
                raise damaged(self.index.path, exc) or WriteError(
                    f"{display(self.index.path)}: cannot write to the index: {exc}"
                ) from None
            return
        try:
            self.index._flush_sketches()
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise WriteError(f"{display(self.index.path)}: cannot commit to the index: {exc}") from None


# --------------------------------------------------------------------------------------------------------------
# Incremental update


@dataclass
class UpdateSummary:
    """What one run did, in counts (``--format json``), and the failures (path, error)."""

    added: int = 0
    updated: int = 0
    moved: int = 0
    removed: int = 0
    unchanged: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("added", "updated", "moved", "removed", "unchanged", "failed")}


@dataclass
class Plan:
    """What an update must do: rows to compute with the networks (``todo``, with ``changed`` marking which of
    them are updates of an existing row), and the metadata-only work done before."""

    todo: list[FileState] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    moves: list[tuple[int, FileState]] = field(default_factory=list)
    copies: list[tuple[int, FileState, bool]] = field(default_factory=list)
    touches: list[tuple[int, FileState]] = field(default_factory=list)
    removals: list[int] = field(default_factory=list)
    unchanged: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)


def plan_update(index: Index, paths: Sequence[str], on_file: Callable[[], Any] | None = None) -> Plan:
    """Compare the files named with the index: what is new, changed, moved, copied, gone or unchanged.

    Only new files and files whose size or mtime changed are read (hashed). ``on_file`` is called per path.
    """
    plan = Plan()
    known = index.known()
    by_hash: dict[bytes, list[bytes]] = {}
    for key, (_, _, _, digest, _) in known.items():
        by_hash.setdefault(digest, []).append(key)
    seen: set[bytes] = set()
    replaced: set[bytes] = set()
    fresh: list[tuple[FileState, tuple[int, int, int, bytes, bool] | None]] = []
    for path in dict.fromkeys(os.path.abspath(p) for p in paths):
        if on_file is not None:
            on_file()
        key = fs_path(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            plan.missing.append((path, f"{display(path)}: cannot read the file ({exc.strerror or exc})"))
            continue
        why = not_a_file(path, st)
        if why is not None:  # not an image any more (a FIFO or folder in its place): its row goes, as a gone file's
            plan.missing.append((path, why))
            replaced.add(key)
            continue
        seen.add(key)
        row = known.get(key)
        if row is not None and row[1] == st.st_size and row[2] == st.st_mtime_ns and not row[4]:
            plan.unchanged += 1
            continue
        try:
            state = probe(path, st)
        except OSError as exc:
            plan.missing.append((path, f"{display(path)}: cannot read the file ({exc.strerror or exc})"))
            continue
        fresh.append((state, row))
    gone = {key for key in known if key not in seen and (key in replaced or not os.path.lexists(os.fsdecode(key)))}
    for state, row in fresh:
        if row is not None:
            if row[3] == state.sha256 and not row[4]:
                plan.touches.append((row[0], state))
                continue
            source = index.with_results(state.sha256)
            if source is not None:
                plan.copies.append((source, state, True))
            else:
                plan.todo.append(state)
                plan.changed.add(state.path)
            continue
        # a file that failed is computed again, not moved with its error (a rename is no repair)
        old = next((k for k in by_hash.get(state.sha256, ()) if k in gone and not known[k][4]), None)
        if old is not None:
            gone.discard(old)
            plan.moves.append((known[old][0], state))
            continue
        source = index.with_results(state.sha256)
        if source is not None:
            plan.copies.append((source, state, False))
        else:
            plan.todo.append(state)
    plan.removals = [known[key][0] for key in sorted(gone)]
    return plan


def update(
    index: Index,
    paths: Sequence[str],
    *,
    model: Any,
    net: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 16,
    workers: int = 0,
    on_file: Callable[[], Any] | None = None,
    on_plan: Callable[[Plan], Any] | None = None,
    on_batch: Callable[[list[Record]], Any] | None = None,
    decode: str = "cpu",
) -> UpdateSummary:
    """Bring the index up to date with ``paths``: plan, apply the metadata-only changes, then run ``net`` (a
    :class:`CombinedNet`; ``model`` gives the device) over the new and changed files, a batch per commit.
    ``decode="cuda"``: JPEG files decoded on that GPU (:mod:`i2v_cli.gpudecode`)."""
    from .pipeline import run_job

    plan = plan_update(index, paths, on_file)
    if on_plan is not None:
        on_plan(plan)
    summary = UpdateSummary()
    apply_plan(index, plan, summary)
    if plan.todo:
        states = {s.path: s for s in plan.todo}

        def count(records: list[Record]) -> None:
            for record in records:
                if "error" in record:
                    summary.failed += 1
                    summary.failures.append((record["path"], record["error"]))
                elif record["path"] in plan.changed:
                    summary.updated += 1
                else:
                    summary.added += 1
            if on_batch is not None:
                on_batch(records)

        run_job(model, [s.path for s in plan.todo], records=IndexRecords(), sink=IndexSink(index, states),
                batch_size=batch_size, workers=workers, net=net, on_batch=count, decode=decode)  # fmt: skip
    return summary


class CombinedNet:
    """Both networks on one decoded batch: ``[tag probabilities | feature]`` per image, so each image is decoded
    once. Any :data:`~i2v_cli.inference.Predictor` pair."""

    def __init__(
        self, tag_net: Callable[[torch.Tensor], torch.Tensor], feature_net: Callable[[torch.Tensor], torch.Tensor]
    ):
        self.tag_net = tag_net
        self.feature_net = feature_net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.cat([self.tag_net(x).float(), self.feature_net(x).float()], dim=1)


@dataclass(frozen=True)
class IndexRecords:
    """Records of a combined batch: ``{"path", "scores", "feature"}`` or ``{"path", "error"}``."""

    def __call__(self, results: Sequence[Any]) -> list[Record]:
        out: list[Record] = []
        for r in results:
            if r.output is None:
                out.append({"path": r.path, "error": r.error or "no output"})
            else:
                out.append({"path": r.path, "scores": r.output[:NUM_TAGS], "feature": r.output[NUM_TAGS:]})
        return out


class IndexSink(Sink):
    """Writes each batch of :class:`IndexRecords` into the index in one transaction (a killed run keeps every
    batch committed). ``states`` gives each path's :class:`FileState`."""

    def __init__(self, index: Index, states: dict[str, FileState]) -> None:
        self.index = index
        self.states = states

    def write(self, records: Iterable[Record]) -> None:
        with self.index.transaction():
            for record in records:
                state = self.states[record["path"]]
                if "error" in record:
                    self.index.put(state, None, None, record["error"])
                else:
                    self.index.put(state, record["scores"], record["feature"], None)

    def close(self) -> None:
        """Every batch is committed when written: nothing to finish."""

    def abort(self) -> None:
        """A batch not committed was rolled back: nothing to undo."""


def apply_plan(index: Index, plan: Plan, summary: UpdateSummary) -> None:
    """The metadata-only part of a plan (moves, copies, touches, removals), committed in batches."""
    steps: list[Callable[[], None]] = []
    for row, state in plan.moves:
        steps.append(lambda row=row, state=state: index.move(row, state))
    for source, state, _ in plan.copies:
        steps.append(lambda source=source, state=state: index.copy_results(source, state))
    for row, state in plan.touches:
        steps.append(lambda row=row, state=state: index.touch(row, state))
    for row in plan.removals:
        steps.append(lambda row=row: index.remove(row))
    # The copies' sources as they are before any step: a source may itself be a copy's target (names swapped).
    with index.held_results(source for source, _, _ in plan.copies):
        for start in range(0, len(steps), COMMIT_ROWS):
            with index.transaction():
                for step in steps[start : start + COMMIT_ROWS]:
                    step()
    summary.moved += len(plan.moves)
    summary.added += sum(not changed for _, _, changed in plan.copies)
    summary.updated += sum(changed for _, _, changed in plan.copies)
    summary.unchanged += plan.unchanged + len(plan.touches)
    summary.removed += len(plan.removals)
    summary.failed += len(plan.missing)
    summary.failures.extend(plan.missing)


def iter_chunks(cursor: Iterable[tuple[Any, ...]], size: int) -> Iterator[list[tuple[Any, ...]]]:
    """Rows of a cursor ``size`` at a time."""
    chunk: list[tuple[Any, ...]] = []
    for row in cursor:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
