"""Decoding (i2v_cli.decode): messages that say what is wrong, Pillow's warnings kept off stderr, library
errors turned into the image's error and bugs left alone, EXIF orientation applied or refused."""

from __future__ import annotations

import io
import struct
import sys
import threading
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, PngImagePlugin

from i2v_cli import decode
from i2v_cli.decode import DECODE_ERRORS, decode_image, exif_orientation, image_to_array, open_image
from i2v_cli.errors import ImageDecodeError
from i2v_cli.transform import load_and_preprocess

HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(100)
AVIF = b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + bytes(100)


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _error(path: Path) -> str:
    """The message of the ImageDecodeError that decoding ``path`` raises; it must name the file once."""
    with pytest.raises(ImageDecodeError) as info:
        load_and_preprocess(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and message.count(path.name) == 1, message
    assert "\n" not in message
    return message


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with(chunk: bytes, after_data: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(buf, "PNG")
    png = buf.getvalue()
    cut = len(png) - 12 if after_data else 33  # before IEND, or right after IHDR
    return png[:cut] + chunk + png[cut:]


# --------------------------------------------------------------------------------------------------------
# Messages (issue 13.5)


def test_heic_without_a_decoder_says_so(tmp_path):
    message = _error(_write(tmp_path, "photo.heic", HEIC))
    assert message == (
        f"{tmp_path / 'photo.heic'}: HEIC image, but Pillow has no HEIC decoder here; install pillow-heif or convert it"
    )


def test_avif_without_a_decoder_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(decode.features, "check", lambda feature: False)  # a Pillow built without libavif
    message = _error(_write(tmp_path, "a.avif", AVIF))
    assert "AVIF image, but Pillow has no AVIF decoder here; install pillow-avif-plugin" in message
    monkeypatch.undo()
    assert "corrupt AVIF file" in _error(_write(tmp_path, "b.avif", AVIF))  # this Pillow reads AVIF


class _FakeHeif(ImageFile.ImageFile):
    format = "FAKEHEIF"

    def _open(self) -> None:
        self._mode = "RGB"
        self._size = (3, 2)
        self.tile = []
        self.im = Image.core.fill("RGB", self.size, (10, 20, 30))


def test_an_installed_heic_plugin_is_registered_and_used(tmp_path, monkeypatch):
    calls = []

    def register_heif_opener() -> None:
        calls.append(1)
        Image.register_open(_FakeHeif.format, _FakeHeif, lambda prefix: prefix[4:12] == b"ftypheic")

    monkeypatch.setattr(Image, "ID", list(Image.ID))
    monkeypatch.setattr(Image, "OPEN", dict(Image.OPEN))
    monkeypatch.setattr(decode, "_plugins_tried", set())
    monkeypatch.setattr(decode, "_plugins_loaded", set())
    monkeypatch.setitem(sys.modules, "pillow_heif", types.SimpleNamespace(register_heif_opener=register_heif_opener))
    path = _write(tmp_path, "photo.heic", HEIC)
    np.testing.assert_array_equal(image_to_array(open_image(path)), np.full((2, 3, 3), [10, 20, 30]))
    open_image(path)
    assert calls == [1]  # registered once
    broken = _write(tmp_path, "broken.heic", HEIC[:4] + b"ftypmif1" + HEIC[12:])  # HEIC the plugin rejects
    assert _error(broken).endswith("broken.heic: truncated or corrupt HEIC file (its header cannot be read)")


@pytest.mark.parametrize("after_data", [False, True], ids=["before-IDAT", "after-IDAT"])
@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
def test_png_text_chunk_over_pillows_limit_says_what_the_limit_is(tmp_path, kind, after_data):
    text = zlib.compress(b"x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1))
    body = b"Comment\0\0" + text if kind == b"zTXt" else b"Comment\0\1\0\0\0" + text
    message = _error(_write(tmp_path, "big-text.png", _png_with(_chunk(kind, body), after_data)))
    assert message == (
        f"{tmp_path / 'big-text.png'}: a PNG metadata chunk (text or ICC profile) decompresses to more than "
        "1 MiB, Pillow's limit (PIL.PngImagePlugin.MAX_TEXT_CHUNK); the pixels may be fine. i2v has no option "
        "to lift it: strip the metadata (for example `exiftool -all= FILE` or `magick FILE -strip OUT.png`), "
        "or from Python raise PIL.PngImagePlugin.MAX_TEXT_CHUNK before decoding"
    )


def test_png_text_over_pillows_total_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 2 * 2**20)
    chunks = b"".join(_chunk(b"tEXt", b"k%d\0" % i + b"y" * 2**20) for i in range(3))
    message = _error(_write(tmp_path, "texts.png", _png_with(chunks)))
    assert "the PNG's text chunks hold more than 2 MiB in all, Pillow's limit (PIL.PngImagePlugin.MAX_TEXT_MEMORY)" in (
        message
    )
    monkeypatch.setattr(PngImagePlugin, "MAX_TEXT_MEMORY", 4 * 2**20)
    assert load_and_preprocess(tmp_path / "texts.png").shape[0] == 3  # lifted: decodes


def test_text_file_hints_at_reading_paths_from_stdin(tmp_path):
    listing = _write(tmp_path, "paths.txt", b"a.png\nb.png\n")
    assert _error(listing) == f"{listing}: a text file, not an image (to read image paths listed in a file use " + (
        "`i2v tag - < FILE`)"
    )
    named_like_an_image = _write(tmp_path, "notes.jpg", b"a shopping list\n")
    assert _error(named_like_an_image) == f"{named_like_an_image}: a text file, not an image"


def test_weight_files_are_named_for_what_they_are(tmp_path):
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    safetensors = struct.pack("<Q", len(header)) + header + bytes(4)
    assert _error(_write(tmp_path, "w.png", safetensors)).endswith("w.png: a safetensors file, not an image")
    assert "a gzip file, not an image" in _error(_write(tmp_path, "g.png", zlib.compress(b"x")[:0] + b"\x1f\x8b\x08"))


def test_truncated_and_corrupt_messages_name_the_format(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    assert "truncated PNG file" in _error(_write(tmp_path, "cut.png", png[: len(png) // 2]))
    assert _error(_write(tmp_path, "head.png", png[:20])).endswith(
        "head.png: truncated PNG file (its header is cut short)"
    )
    broken = bytearray(png)
    broken[12:16] = b"IHDX"  # the first chunk must be IHDR
    assert "head.png" not in _error(_write(tmp_path, "bad.png", bytes(broken)))
    assert _error(tmp_path / "bad.png").endswith("bad.png: truncated or corrupt PNG file (its header cannot be read)")


# --------------------------------------------------------------------------------------------------------
# Pillow's warnings (issue 13.5)


def _exif_overrunning_its_data() -> bytes:
    """EXIF whose ImageDescription claims 100,000 bytes: Pillow warns "Tag data larger than file"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 50
    raw = bytearray(exif.tobytes())
    at = raw.find(struct.pack(">H", 0x010E))
    raw[at + 4 : at + 8] = struct.pack(">I", 100_000)
    return bytes(raw)


def test_pillow_warnings_do_not_leak(tmp_path):
    Image.new("RGB", (16, 8), (200, 10, 10)).save(tmp_path / "badexif.jpg", exif=_exif_overrunning_its_data())
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        img = open_image(tmp_path / "badexif.jpg")
    assert [str(w.message) for w in seen] == []
    assert img.size == (8, 16)  # the orientation was still read: rotated
    assert warnings.filters == filters


def test_pillow_warnings_outside_decoding_are_left_alone():
    with pytest.warns(UserWarning, match="from Pillow"):
        with decode._pillow_scope():
            pass
        warnings.warn_explicit("from Pillow", UserWarning, "x.py", 1, module="PIL.Image")


def test_warning_filters_survive_threads(tmp_path):
    """The scope adds its filters once and removes them when the last thread leaves, whatever the order."""
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    filters = list(warnings.filters)
    barrier = threading.Barrier(4)

    def work() -> None:
        barrier.wait()
        for _ in range(20):
            open_image(tmp_path / "a.png")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == filters


# --------------------------------------------------------------------------------------------------------
# Library errors become the image's error; bugs stay bugs (issue 13.6)


def test_decode_errors_is_the_documented_tuple():
    documented = (
        OSError,
        SyntaxError,
        ValueError,
        RuntimeError,
        struct.error,
        EOFError,
        zlib.error,
        MemoryError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    )
    assert documented == DECODE_ERRORS


def test_a_bug_while_decoding_is_not_an_image_error(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")

    def broken_load(self):
        raise AttributeError("a bug in a plugin or in i2v")

    monkeypatch.setattr(ImageFile.ImageFile, "load", broken_load)
    with pytest.raises(AttributeError, match="a bug"):
        load_and_preprocess(tmp_path / "a.png")


def test_running_out_of_memory_is_the_images_error(tmp_path, monkeypatch):
    Image.new("RGB", (8, 6)).save(tmp_path / "a.png")

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    assert _error(tmp_path / "a.png").endswith("a.png: the 8x6 PNG image is too large for memory")


def test_a_failed_exif_rotation_is_an_error_not_an_unrotated_image(tmp_path, monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "rot.jpg", exif=exif.tobytes())

    def fail(self, method):
        raise MemoryError

    monkeypatch.setattr(Image.Image, "transpose", fail)
    assert _error(tmp_path / "rot.jpg").endswith("rot.jpg: cannot apply its EXIF orientation 6 (MemoryError)")


def test_unreadable_or_invalid_exif_means_stored_upright(monkeypatch):
    img = Image.new("RGB", (4, 2))
    img.getexif()[0x0112] = 9  # not an orientation
    assert exif_orientation(img) == 1 and decode_image(img) is img

    def unreadable(self):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(Image.Image, "getexif", unreadable)
    assert exif_orientation(Image.new("RGB", (4, 2))) == 1


# --------------------------------------------------------------------------------------------------------
# EXIF orientation, the same for files and PIL images (issue 14.8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pil_image_gets_the_files_orientation(tmp_path, orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(rgb).save(path, exif=exif.tobytes(), quality=95)
    from i2v_cli.transform import preprocess

    with Image.open(path) as img:
        got = preprocess(img)
        assert img.size == (50, 30)  # the caller's image is left as it was
    want = load_and_preprocess(path)
    assert float((got - want).abs().max()) <= 1e-6
    upright = open_image(path).size
    assert upright == ((30, 50) if orientation >= 5 else (50, 30))


def test_decode_image_refuses_what_open_image_refuses(monkeypatch):
    with pytest.raises(ImageDecodeError, match=r"^image: the image has an empty size 0x5$"):
        decode_image(Image.new("RGB", (0, 5)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(Image.new("RGB", (20, 20)))
