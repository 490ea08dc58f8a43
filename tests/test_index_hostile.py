"""A hostile user of the collection commands: read-only index files, indexes that change under a reader,
exact duplicates in their thousands, thresholds at the ends of their range, ``--like`` through a symlink."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from i2v_cli.config import NUM_TAGS
from i2v_cli.errors import WriteError
from i2v_cli.index import FileState, Index, IndexDbError

DIM = 64


def _index(path: str, features: np.ndarray) -> Index:
    """A synthetic index: one row a feature, at /c/00000.png, /c/00001.png, ..."""
    idx = Index(path, create=True)
    idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, features.shape[1])
    with idx.transaction():
        for i, f in enumerate(features):
            scores = np.zeros(NUM_TAGS, np.float32)
            scores[-3] = 1.0
            idx.put(FileState(f"/c/{i:05d}.png", 100 + i, i, i.to_bytes(32, "big"), 64, 64, "PNG"), scores, f, None)
    return idx


def _make_version_1(db: str) -> None:
    con = sqlite3.connect(db)
    con.executescript(
        "DROP TABLE sketch_blocks; DROP TABLE sketch_basis; DROP INDEX images_rating; PRAGMA user_version = 1;"
    )
    con.close()


def _unwritable_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every SQLite connection opened from now on may begin a transaction but not write in it, as with a file
    opened read-only (root ignores file permissions, so the test cannot chmod)."""
    connect = sqlite3.connect
    writes = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE, sqlite3.SQLITE_CREATE_TABLE,
              sqlite3.SQLITE_CREATE_INDEX}  # fmt: skip

    def unwritable(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)  # type: ignore[arg-type]
        conn.set_authorizer(lambda action, *_: sqlite3.SQLITE_DENY if action in writes else sqlite3.SQLITE_OK)
        return conn

    monkeypatch.setattr(sqlite3, "connect", unwritable)


def test_a_read_only_version_1_index_opened_to_write_is_a_message(tmp_path, monkeypatch):
    # `i2v index` on a version-1 file it may not write used to end in a traceback (sqlite3.OperationalError from
    # the upgrade); it is an IndexDbError naming the file and the upgrade, and the file stays version 1.
    db = str(tmp_path / "c.db")
    _index(db, np.eye(4, DIM, dtype=np.float32)).close()
    _make_version_1(db)
    _unwritable_connections(monkeypatch)
    with pytest.raises(IndexDbError, match=r"c\.db: cannot write to the index: not authorized \(upgrading it from "
                       r"schema version 1 to 2"):  # fmt: skip
        Index(db)
    monkeypatch.undo()
    with Index(db, readonly=True) as idx:
        assert idx.version == 1 and idx.count() == 4


def test_a_write_to_a_read_only_index_is_a_write_error(tmp_path):
    db = str(tmp_path / "c.db")
    with _index(db, np.eye(4, DIM, dtype=np.float32)) as idx:
        unwritable = pytest.raises(WriteError, match=r"c\.db: cannot write to the index: attempt to write a readonly")
        with unwritable, idx.transaction():
            idx.conn.execute("PRAGMA query_only = ON")  # as a read-only file does: BEGIN works, writes fail
            idx.remove(1)
        idx.conn.execute("PRAGMA query_only = OFF")
        assert idx.count() == 4 and not idx.conn.in_transaction and not idx._pending
