"""SHA-256 of a file's bytes, read in chunks: the one helper for weights, downloads, caches and the index."""

from __future__ import annotations

import hashlib
import os

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> bytes:
    """The SHA-256 digest of the file's bytes (raises OSError; callers say what the file was for)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()
