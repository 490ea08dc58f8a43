"""i2v_cli.sniff: a file's kind from its first bytes, for images and weight files alike."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from i2v_cli.sniff import FOREIGN_KINDS, HEAD_BYTES, IMAGE_KINDS, KINDS, describe, read_head, sniff

GOLDEN = Path(__file__).parent / "data" / "golden"


def _image_bytes(fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "kind"),
    [
        ("JPEG", "jpeg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
        ("BMP", "bmp"),
        ("TIFF", "tiff"),
        ("AVIF", "avif"),
    ],
)
def test_images_pillow_writes(fmt, kind):
    assert sniff(_image_bytes(fmt)[:HEAD_BYTES]) == kind
    assert kind in IMAGE_KINDS


def test_iso_media_brands():
    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\0\0\0\0" + b"".join(compatible)
        return struct.pack(">I", 8 + len(body)) + b"ftyp" + body + bytes(16)

    assert sniff(ftyp(b"heic", b"mif1", b"heic")) == "heic"
    assert sniff(ftyp(b"mif1", b"mif1", b"heic")) == "heic"
    assert sniff(ftyp(b"mif1", b"avif", b"mif1")) == "avif"
    assert sniff(ftyp(b"avis", b"avis")) == "avif"
    assert sniff(ftyp(b"mif1", b"mif1")) == "heif"
    assert sniff(ftyp(b"isom", b"isom", b"mp41")) == "video"
    assert sniff(b"\x00\x00\x00\x0cJXL \r\n\x87\n" + bytes(8)) == "jxl"


def test_weight_and_data_formats(tmp_path):
    header = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert sniff(struct.pack("<Q", len(header)) + header) == "safetensors"
    torch.save({"w": torch.zeros(1)}, tmp_path / "new.pth")
    assert sniff((tmp_path / "new.pth").read_bytes()[:HEAD_BYTES]) == "zip"
    assert sniff(pickle.dumps({"w": 1}, protocol=2)) == "pickle"
    assert sniff(gzip.compress(b"[]")) == "gzip"
    np.save(tmp_path / "a.npy", np.zeros(3))
    assert sniff((tmp_path / "a.npy").read_bytes()) == "npy"
    assert sniff(b"\x89HDF\r\n\x1a\n" + bytes(8)) == "hdf5"
    assert sniff(b"PK\x03\x04rest") == "zip"


@pytest.mark.parametrize("name", ["tag_v1", "tag_v2", "feature_v1"])
def test_caffemodels(name):
    data = (GOLDEN / "models" / f"{name}.caffemodel").read_bytes()
    assert sniff(data[:HEAD_BYTES]) == "caffemodel"
    assert sniff(data[:1] + b"\x80") == "caffemodel"  # a key, cut inside its length


def test_text_empty_unknown():
    assert sniff(b"") == "empty"
    assert sniff(b"a.png\nb.png\n") == "text"
    assert sniff("イラスト.png\n".encode()[:-2]) == "text"  # a multi-byte character cut at the end is allowed
    assert sniff(b"\n\nBM is not a bitmap\n") == "text"
    assert sniff(b"BMW 320i\n") == "text"  # "BM", but not a BMP header
    assert sniff(b"\x00\x01\x02\x03") == "unknown"
    assert sniff(b"\xff\xfe\x00\x00") == "unknown"


@given(st.binary(max_size=64))
def test_any_bytes_give_a_documented_kind(head):
    kind = sniff(head)
    assert kind in KINDS
    assert describe(kind) == KINDS[kind]


def test_sqlite_databases_and_files_read_without_blocking(tmp_path):
    import os
    import sqlite3

    with sqlite3.connect(tmp_path / "a.db") as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    assert sniff(read_head(str(tmp_path / "a.db"))) == "sqlite" and "sqlite" in FOREIGN_KINDS
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would block without O_NONBLOCK
    assert read_head(str(tmp_path / "fifo")) is None
    assert read_head(str(tmp_path)) is None and read_head(str(tmp_path / "missing")) is None
    assert not {"text", "npy", "empty", "unknown"} & FOREIGN_KINDS  # what i2v writes, or might have
