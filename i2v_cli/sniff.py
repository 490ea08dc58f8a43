"""What kind of file this is, from its first bytes: one helper for images and weight files alike.

Used to say "a text file, not an image" or "a HEIC image, but Pillow has no HEIC decoder" instead of a
library's vague error, and to tell weight formats apart by content rather than by name. Pure function of
the bytes given (:func:`sniff`), plus one reader of a file's first bytes that never blocks (:func:`read_head`).
"""

from __future__ import annotations

import codecs
import os
import stat

__all__ = [
    "FOREIGN_KINDS",
    "HEAD_BYTES",
    "IMAGE_KINDS",
    "KINDS",
    "describe",
    "is_text",
    "read_head",
    "sniff",
]

#: How many bytes from the start of a file :func:`sniff` wants. Fewer work (a short file is whole), but
#: the text check and the ISO-media brand list look further than the magic numbers.
HEAD_BYTES = 1024

#: Every value :func:`sniff` returns, with the words used for it in messages.
KINDS: dict[str, str] = {
    # Images Pillow reads (AVIF only when Pillow was built with libavif)
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WebP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "avif": "AVIF",
    # Images Pillow does not read without a plugin
    "heic": "HEIC",  # HEIF with HEVC images (iPhone photos): pillow-heif
    "heif": "HEIF",  # HEIF whose brands say neither HEVC nor AV1
    "jxl": "JPEG XL",
    # Other ISO media files (ftyp box): MP4, MOV, 3GP video
    "video": "video (MP4/MOV)",
    # Weight and data formats
    "safetensors": "safetensors",
    "zip": "zip archive (a PyTorch .pth saved by torch >= 1.6 is one)",
    "pickle": "Python pickle (a PyTorch .pth saved by an old torch is one)",
    "caffemodel": "Caffe model (protobuf)",
    "npy": "numpy .npy",
    "hdf5": "HDF5",
    "gzip": "gzip",
    "sqlite": "SQLite database",
    # Neither
    "text": "text",
    "empty": "empty",
    "unknown": "unknown",
}

#: Kinds that are pictures (whether or not this Pillow can decode them).
IMAGE_KINDS = frozenset({"jpeg", "png", "gif", "webp", "bmp", "tiff", "avif", "heic", "heif", "jxl"})

#: Kinds that no command of i2v writes as its output (it writes text, and ``.npy`` for features): a file of one of
#: these kinds named by ``-o`` belongs to something else, and is not replaced.
FOREIGN_KINDS = IMAGE_KINDS | frozenset(
    {"video", "safetensors", "zip", "pickle", "caffemodel", "hdf5", "gzip", "sqlite"}
)

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jxl"),  # JPEG XL container
    (b"\xff\x0a", "jxl"),  # JPEG XL bare codestream
    (b"PK\x03\x04", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"\x93NUMPY", "npy"),
    (b"\x89HDF\r\n\x1a\n", "hdf5"),
    (b"SQLite format 3\x00", "sqlite"),
)

#: Sizes of the BMP info headers Pillow knows (OS/2 v1, Windows v1-v5, OS/2 v2).
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1", b"mif2"})
#: Caffe's NetParameter fields and their protobuf wire types (0 varint, 2 length-delimited): name 1,
#: layers (V1) 2, input 3, input_dim 4 (plain or packed), force_backward 5, state 6, debug_info 7,
#: input_shape 8, layer (V2) 100. Caffe writes fields in number order, so a caffemodel starts with one.
_NET_FIELDS: dict[int, frozenset[int]] = {
    1: frozenset({2}),
    2: frozenset({2}),
    3: frozenset({2}),
    4: frozenset({0, 2}),
    5: frozenset({0}),
    6: frozenset({2}),
    7: frozenset({0}),
    8: frozenset({2}),
    100: frozenset({2}),
}


def sniff(head: bytes) -> str:
    """The kind of a file whose first bytes (up to :data:`HEAD_BYTES`; the whole file when shorter) are
    ``head``: one of the keys of :data:`KINDS`.

    Images: ``jpeg``, ``png``, ``gif``, ``webp``, ``bmp``, ``tiff``, ``avif``, ``heic``, ``heif``, ``jxl``.
    Weights and data: ``safetensors`` (8-byte little-endian header length, then ``{``), ``zip`` (a PyTorch
    ``.pth`` since torch 1.6), ``pickle`` (protocol 2-5: an older ``.pth``), ``caffemodel`` (starts like a
    Caffe NetParameter; protobuf has no magic number, so parsing must confirm it), ``npy``, ``hdf5``,
    ``gzip``, ``sqlite``. Otherwise ``video`` (other ISO media), ``text`` (UTF-8 without control characters), ``empty``
    or ``unknown``.
    """
    if not head:
        return "empty"
    if _is_safetensors(head):
        return "safetensors"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return _iso_media(head)
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in _BMP_HEADER_SIZES:
        return "bmp"
    if is_text(head):
        return "text"
    if _looks_like_caffemodel(head):
        return "caffemodel"
    return "unknown"


def read_head(path: str) -> bytes | None:
    """The first :data:`HEAD_BYTES` bytes of the regular file at ``path`` (symlinks followed); None when it is
    missing, unreadable or not a regular file. Opened without blocking, so a FIFO never hangs it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, HEAD_BYTES)
    except OSError:
        return None
    finally:
        os.close(fd)


def describe(kind: str) -> str:
    """The words for a kind in messages (``"JPEG"``, ``"safetensors"``, ...)."""
    return KINDS.get(kind, kind)


def is_text(head: bytes) -> bool:
    """Whether ``head`` is UTF-8 text without control characters (a multi-byte character cut at the end of
    the sample is allowed)."""
    if not head or b"\x00" in head:
        return False
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text)


def _is_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _iso_media(head: bytes) -> str:
    """HEIC, AVIF, HEIF or other ISO media, from the ftyp box's major and compatible brands."""
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), size if size >= 16 else 16)
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIC_BRANDS:
        return "heic"
    if brands & _HEIF_BRANDS:
        return "heif"
    return "video"


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """A protobuf varint at ``pos``: (value, next position), or None when cut or longer than 10 bytes."""
    value = shift = 0
    for i in range(pos, min(len(data), pos + 10)):
        value |= (data[i] & 0x7F) << shift
        if data[i] < 0x80:
            return value, i + 1
        shift += 7
    return None


def _looks_like_caffemodel(head: bytes) -> bool:
    """Whether ``head`` starts with NetParameter fields: the first key must be one, and so must the next
    when the first field ends within ``head``."""
    pos = 0
    for _ in range(2):
        if pos >= len(head):
            return pos > 0  # a short file that ends exactly after a field
        key = _varint(head, pos)
        if key is None:
            return pos > 0
        field, wire = key[0] >> 3, key[0] & 7
        if wire not in _NET_FIELDS.get(field, ()):
            return False
        pos = key[1]
        value = _varint(head, pos)
        if value is None:
            return True  # cut inside the value: the key alone was a NetParameter field
        pos = value[1] + (value[0] if wire == 2 else 0)
        if pos > len(head):
            return True  # the field goes on past the sample
    return True
