"""Decoding: an image file (or a PIL image) to a checked, fully loaded, upright Pillow image, and its pixels
as RGB values 0-255 read a strip of rows at a time (the golden spec's step 1).

One path for both entry points: :func:`open_image` (a file: checks, sniffing, opening) and a PIL image
given to :func:`~i2v_cli.transform.preprocess` both go through :func:`decode_image` (first frame loaded,
decompression bombs refused, EXIF orientation applied), so the CLI and the Python API see the same pixels.

Every failure caused by the file is an :class:`~i2v_cli.errors.ImageDecodeError` whose message names the
file once and says what is wrong in plain words; only the exceptions in :data:`DECODE_ERRORS` (what Pillow
raises for bad data) are turned into one. Anything else is a bug and propagates.

Pillow's warnings about a file (corrupt EXIF, palette transparency, malformed MPO, TIFF metadata, ...) are
silenced while decoding: they describe metadata, never wrong pixels. The decompression-bomb warning is
turned into the image's error instead. (libtiff's own C-level messages bypass Python and cannot be caught.)
"""

from __future__ import annotations

import importlib
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Union

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError, features

from .errors import ImageDecodeError, first_line
from .inputs import is_image_name
from .sniff import HEAD_BYTES, IMAGE_KINDS, describe, sniff

__all__ = [
    "DECODE_ERRORS",
    "ImageDecodeError",
    "PathType",
    "RGBPixels",
    "decode_image",
    "display_name",
    "exif_orientation",
    "image_to_array",
    "open_image",
]

PathType = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: What Pillow raises for a file it cannot decode, turned into an ImageDecodeError by this module; found by
#: fuzzing every format Pillow writes (flipped, cut and spliced bytes) and by reading its plugins:
#: OSError (UnidentifiedImageError, truncated data, decoder errors), SyntaxError (bad headers), ValueError
#: (bad header values, PNG text limits), RuntimeError (the AVIF decoder; DDS's NotImplementedError),
#: struct.error (short metadata), EOFError, zlib.error, MemoryError (an image too large to allocate) and
#: the decompression-bomb error (and warning, which :func:`decode_image` raises as an error).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
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

#: EXIF orientation (tag 0x0112) to the transpose that shows the image upright, as Pillow's exif_transpose.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION = 0x0112

#: Pillow plugins that read formats Pillow lacks: the module, and the function that registers it (None: the
#: import does). Tried once, when such a file cannot be identified, so that installing one is enough.
_PLUGINS = {
    "heic": ("pillow_heif", "register_heif_opener", "pillow-heif"),
    "heif": ("pillow_heif", "register_heif_opener", "pillow-heif"),
    "avif": ("pillow_avif", None, "pillow-avif-plugin (or a Pillow built with AVIF, 11.3 or later)"),
    "jxl": ("pillow_jxl", None, "pillow-jxl-plugin"),
}
_plugins_tried: set[str] = set()  # kinds whose plugin was looked for
_plugins_loaded: set[str] = set()  # kinds whose plugin is registered


# --------------------------------------------------------------------------------------------------------
# Pillow's warnings, scoped to decoding


_scope_lock = threading.Lock()
_scope_depth = 0
_scope_added: list[tuple] = []


def _filters_changed() -> None:
    """Tell the warnings module its filters changed (filterwarnings does; list.remove cannot). Private: on a
    Python without it, a stale cache can only let a warning pass that the filters would now show."""
    mutated = getattr(warnings, "_filters_mutated", None)
    if mutated is not None:
        mutated()


@contextmanager
def _pillow_scope() -> Iterator[None]:
    """While any thread decodes: Pillow's UserWarnings ignored, the decompression-bomb warning an error.

    ``warnings.catch_warnings`` swaps the process-wide filter list, so two threads leaving it in another
    order than they entered leave the other's filters behind for good. Here the filters are added by the
    first thread in and removed by the last one out, under a lock, and only those this added.
    """
    global _scope_depth
    with _scope_lock:
        if _scope_depth == 0:
            _scope_added.clear()
            for action, category, module in (
                ("ignore", UserWarning, r"PIL\."),
                ("error", Image.DecompressionBombWarning, ""),
            ):
                item = (action, None, category, re.compile(module) if module else None, 0)
                if item not in warnings.filters:  # (one the user set is left to the user)
                    warnings.filterwarnings(action, category=category, module=module)
                    _scope_added.append(item)
        _scope_depth += 1
    try:
        yield
    finally:
        with _scope_lock:
            _scope_depth -= 1
            if _scope_depth == 0:
                for item in _scope_added:
                    if item in warnings.filters:
                        warnings.filters.remove(item)
                _scope_added.clear()
                _filters_changed()


# --------------------------------------------------------------------------------------------------------
# Messages


def display_name(path: PathType) -> str:
    """A path as text for messages (bytes that are not UTF-8 kept as surrogate escapes)."""
    return os.fsdecode(os.fspath(path))


def nul_name_message(name: str) -> str:
    """The message for a name holding a NUL byte (os refuses it with a ValueError), the NUL shown as ``\\0``."""
    shown = name.replace("\0", "\\0")
    return f"{shown}: no file name holds a NUL byte"


def _bomb_message(name: str, pixels: int | None, detail: str = "") -> str:
    if pixels is None:  # Pillow refused it before we saw its size: take the count from its message
        found = re.search(r"\((\d+) pixels\)", detail)
        pixels = int(found.group(1)) if found else None
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return (
        f"{name}: {count}, over the limit of {Image.MAX_IMAGE_PIXELS:,}: refused as a possible decompression "
        "bomb (PIL.Image.MAX_IMAGE_PIXELS sets the limit)"
    )


def _text_limit_message(name: str, detail: str) -> str | None:
    """The message for a PNG whose metadata chunks exceed Pillow's limits, or None for another error."""
    if "MAX_TEXT_CHUNK" in detail:
        size = _mib(PngImagePlugin.MAX_TEXT_CHUNK)
        what = f"a PNG metadata chunk (text or ICC profile) decompresses to more than {size}"
        limit = "PIL.PngImagePlugin.MAX_TEXT_CHUNK"
    elif "MAX_TEXT_MEMORY" in detail:
        what = f"the PNG's text chunks hold more than {_mib(PngImagePlugin.MAX_TEXT_MEMORY)} in all"
        limit = "PIL.PngImagePlugin.MAX_TEXT_MEMORY"
    else:
        return None
    return (
        f"{name}: {what}, Pillow's limit ({limit}); the pixels may be fine. i2v has no option to lift it: "
        f"strip the metadata (for example `exiftool -all= FILE` or `magick FILE -strip OUT.png`), or from "
        f"Python raise {limit} before decoding"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n % 2**20 == 0 else f"{n:,} bytes"


#: Added to "a text file, not an image" for a file not named like an image: the CLI's advice (the server's temporary
#: upload files are not named like images either, and it takes the advice out).
PATH_LIST_HINT = " (to read image paths listed in a file use `i2v tag - < FILE`)"


def _unidentified_message(name: str, kind: str) -> str:
    """Why Pillow could not identify a file, from what its first bytes say it is."""
    if kind in _PLUGINS and kind not in _plugins_loaded and not (kind == "avif" and features.check("avif")):
        what, plugin = describe(kind), _PLUGINS[kind][2]
        return f"{name}: {what} image, but Pillow has no {what} decoder here; install {plugin} or convert it"
    if kind in IMAGE_KINDS:
        return f"{name}: truncated or corrupt {describe(kind)} file (its header cannot be read)"
    if kind == "text":
        hint = "" if is_image_name(name) else PATH_LIST_HINT
        return f"{name}: a text file, not an image{hint}"
    if kind == "unknown":
        return f"{name}: not an image, or in a format Pillow cannot read (unknown file type)"
    return f"{name}: a {describe(kind)} file, not an image"


def _failure(
    exc: BaseException, name: str, fmt: str, *, header: bool = False, size: tuple[int, int] | None = None
) -> ImageDecodeError:
    """The ImageDecodeError for one of DECODE_ERRORS raised while opening (``header``) or decoding a file."""
    detail = first_line(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageDecodeError(_bomb_message(name, None, str(exc)))
    if isinstance(exc, MemoryError):
        dims = f"{size[0]}x{size[1]} " if size else ""
        what = "image" if fmt == "image" else f"{fmt} image"
        return ImageDecodeError(f"{name}: the {dims}{what} is too large for memory")
    if isinstance(exc, OSError) and exc.errno is not None:  # the disk or the file system, not the data
        return ImageDecodeError(f"{name}: cannot read the file ({exc.strerror or detail})")
    if isinstance(exc, ValueError) and (message := _text_limit_message(name, str(exc))):
        return ImageDecodeError(message)
    if isinstance(exc, EOFError) or "truncat" in detail.lower():
        cut = "its header is cut short" if header else detail
        return ImageDecodeError(f"{name}: truncated {fmt} file ({cut})")
    if header:
        return ImageDecodeError(f"{name}: corrupt {fmt} file, its header cannot be read ({detail})")
    return ImageDecodeError(f"{name}: corrupt {fmt} data ({detail})")


# --------------------------------------------------------------------------------------------------------
# Files


def _check_file(path: PathType, name: str) -> os.stat_result:
    """Say in words why ``path`` is not a readable regular file, before Pillow gives a vaguer error."""
    try:
        lst = os.lstat(path)
    except ValueError:  # what os raises for a name with a NUL byte, which no file can have
        raise ImageDecodeError(nul_name_message(name)) from None
    except FileNotFoundError:
        raise ImageDecodeError(f"{name}: no such file") from None
    except PermissionError:
        raise ImageDecodeError(f"{name}: permission denied (cannot look at the file)") from None
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot access the file ({exc.strerror or exc})") from None
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            try:
                target = os.fsdecode(os.readlink(path))
            except OSError:
                target = "?"
            raise ImageDecodeError(f"{name}: dangling symbolic link (its target {target!r} does not exist)") from None
        except OSError as exc:
            raise ImageDecodeError(f"{name}: broken symbolic link ({exc.strerror or exc})") from None
    else:
        st = lst
    if stat.S_ISDIR(st.st_mode):
        _check_folder(path, name)
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(f"{name}: not a regular file (a device, pipe or socket), not an image")
    if st.st_size == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    return st


def _check_folder(path: PathType, name: str) -> None:
    """Always raises: a folder is not an image. One that cannot be listed is how
    :func:`~i2v_cli.inputs.expand_inputs` reports a folder it could not read, so say that."""
    try:
        with os.scandir(path):
            pass
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot read the folder ({exc.strerror or exc})") from None
    raise ImageDecodeError(f"{name}: is a folder, not an image file")


def _open(fp, name: str, kind: str) -> Image.Image:
    """Image.open on an open binary file, with a plugin for HEIC/AVIF/JPEG XL loaded when one is installed."""
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        if not _load_plugin(kind):
            raise
    fp.seek(0)
    return Image.open(fp)


def _load_plugin(kind: str) -> bool:
    """Import (once) the Pillow plugin for ``kind`` if it is installed; whether one was newly loaded."""
    if kind not in _PLUGINS or kind in _plugins_tried:
        return False
    module_name, register, _ = _PLUGINS[kind]
    kinds = {k for k, v in _PLUGINS.items() if v[0] == module_name}
    _plugins_tried.update(kinds)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    if register is not None:
        getattr(module, register)()
    _plugins_loaded.update(kinds)
    return True


def open_image(path: PathType) -> Image.Image:
    """Open and fully decode an image file: the first frame, upright by its EXIF orientation.

    Every failure of the file (missing, empty, a folder, truncated, not an image, a format Pillow cannot
    read, a decompression bomb, unreadable, ...) raises ImageDecodeError with a plain-words message naming
    the file once, so that a batch can skip just it.
    """
    name = display_name(path)
    _check_file(path, name)
    try:
        fp = open(path, "rb")  # noqa: SIM115 - closed below; Pillow must not own it
    except PermissionError:
        raise ImageDecodeError(f"{name}: permission denied (the file cannot be read)") from None
    except IsADirectoryError:
        raise ImageDecodeError(f"{name}: is a folder, not an image file") from None
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot open the file ({exc.strerror or exc})") from None
    with fp:
        try:
            head = fp.read(HEAD_BYTES)
            fp.seek(0)
        except OSError as exc:  # a read error on the disk itself
            raise ImageDecodeError(f"{name}: cannot read the file ({exc.strerror or exc})") from None
        kind = sniff(head)
        fmt = describe(kind) if kind in IMAGE_KINDS else "image"
        with _pillow_scope():
            try:
                img = _open(fp, name, kind)
            except UnidentifiedImageError:
                raise ImageDecodeError(_unidentified_message(name, kind)) from None
            except DECODE_ERRORS as exc:
                raise _failure(exc, name, fmt, header=True) from None
            return decode_image(img, name)


# --------------------------------------------------------------------------------------------------------
# A PIL image, however it was made


def _name_of(img: Image.Image) -> str:
    filename = getattr(img, "filename", None)
    return display_name(filename) if filename else "image"


def exif_orientation(img: Image.Image) -> int:
    """The image's EXIF orientation, 1 to 8 (1: stored upright), as Pillow's ``exif_transpose`` reads it
    (EXIF, then XMP). A missing, unreadable or out-of-range value is 1: what image viewers show then."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
    except DECODE_ERRORS:
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def decode_image(img: Image.Image, name: str | None = None) -> Image.Image:
    """``img`` decoded and upright: its current frame (the first, for a file just opened) loaded, a
    decompression bomb or an empty size refused, and its EXIF orientation applied.

    ``img`` itself is never changed (beyond Pillow loading its pixels): a rotated image is a new one.
    A file's orientation that cannot be applied is the image's error, never a silently unrotated image.
    Raises ImageDecodeError naming ``name`` (default: the image's file name, or "image").
    """
    name = _name_of(img) if name is None else name
    fmt = img.format or "image"
    width, height = img.size
    if width <= 0 or height <= 0:
        what = f"{img.format} image" if img.format else "image"
        raise ImageDecodeError(f"{name}: the {what} has an empty size {width}x{height}")
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        raise ImageDecodeError(_bomb_message(name, width * height))
    with _pillow_scope():
        try:
            img.load()
        except DECODE_ERRORS as exc:
            raise _failure(exc, name, fmt, size=img.size) from None
        orientation = exif_orientation(img)
        if orientation == 1:
            return img
        try:
            return img.transpose(_UPRIGHT[orientation])
        except DECODE_ERRORS as exc:
            raise ImageDecodeError(
                f"{name}: cannot apply its EXIF orientation {orientation} ({first_line(exc)})"
            ) from None


# --------------------------------------------------------------------------------------------------------
# Pixels: any mode to RGB values 0-255, a strip of rows at a time

#: Modes whose RGB conversion must go through another mode to keep their real colours.
_VIA = {"P": ("RGBA", "RGB"), "PA": ("RGBA", "RGB"), "RGBa": ("RGBA", "RGB"), "La": ("LA", "RGB")}
_SIXTEEN = ("I;16", "I;16L", "I;16B", "I;16N")


class RGBPixels:
    """A decoded image's pixels as (rows, columns, 3) uint8 RGB in their real colours, for any mode Pillow
    can convert, read a strip of rows at a time so that no copy of the whole image is made (the
    :class:`~i2v_cli.transform.Pixels` that the resize reads).

    Alpha is dropped without compositing (as the original did); palette images go through RGBA (their
    real colours, a transparent index keeping its colour); 16-bit grey keeps its top 8 bits; 32-bit
    integer grey is kept when within 0-255, else read as 16-bit; float grey within [0, 1] is scaled by
    255, other float grey clipped to 0-255. The scale of integer and float grey is decided once for the
    whole image, so every block agrees. Blocks may be read-only (Pillow's buffer).
    """

    def __init__(self, img: Image.Image) -> None:
        self.img = img
        self.width, self.height = img.size
        self.mode = img.mode
        self.dtype = np.dtype(np.uint8)
        self._route: tuple[str, ...] = ()
        self._scale_unit = self._keep_low = False
        if self.mode == "I":
            lo, hi = img.getextrema()
            self._keep_low = lo >= 0 and hi <= 255
        elif self.mode == "F":
            lo, hi = self._float_extrema()
            self._scale_unit = lo >= 0.0 and hi <= 1.0
        elif self.mode in _VIA:
            self._route = _VIA[self.mode]
        elif self.mode not in ("RGB", *_SIXTEEN):
            self._route = self._find_route()

    def _float_extrema(self) -> tuple[float, float]:
        lo, hi = np.inf, -np.inf
        step = max(1, (1 << 22) // max(1, self.width))
        for y in range(0, self.height, step):
            block = np.nan_to_num(np.asarray(self.img.crop((0, y, self.width, min(self.height, y + step)))), nan=0.0)
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        return lo, hi

    def _find_route(self) -> tuple[str, ...]:
        """The conversions that give RGB for this mode (L, LA, 1, RGBA, CMYK, YCbCr, HSV, LAB, ...)."""
        probe = self.img.crop((0, 0, 1, 1))
        for route in (("RGB",), ("RGBA", "RGB"), ("LA", "RGB")):
            try:
                out = probe
                for target in route:
                    out = out.convert(target)
            except (ValueError, OSError):
                continue
            return route
        raise ImageDecodeError(f"{_name_of(self.img)}: cannot convert a {self.mode} image to RGB")

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a (stop - start, width, 3) uint8 array (converted from a crop of them)."""
        return self._block((0, start, self.width, stop))

    def extrema(self) -> None:
        """None: the blocks are uint8, and the resize finds the extrema as it reads them (no extra pass)."""
        return None

    def _block(self, box: tuple[int, int, int, int]) -> np.ndarray:
        whole = box == (0, 0, self.width, self.height)
        with _pillow_scope():
            part = self.img if whole else self.img.crop(box)
            for target in self._route:
                part = part.convert(target)
            values = np.asarray(part)
        if self.mode in _SIXTEEN:
            values = (values.astype(np.uint16, copy=False) >> 8).astype(np.uint8)
        elif self.mode == "I":
            values = values.astype(np.uint8) if self._keep_low else (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        elif self.mode == "F":
            values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0)
            if self._scale_unit:
                values = values * 255.0
            values = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        if values.ndim == 2:
            values = np.repeat(values[:, :, None], 3, axis=2)  # contiguous: faster to convert than a view
        if values.dtype != np.uint8 or values.ndim != 3 or values.shape[2] != 3:  # pragma: no cover - Pillow contract
            raise ImageDecodeError(f"converting a {self.mode} image gave {values.dtype} {values.shape}, not RGB")
        return values


def image_to_array(img: Image.Image) -> np.ndarray:
    """The image's pixels as one (H, W, 3) uint8 RGB array in their real colours (see :class:`RGBPixels`
    for the rules). It holds a copy of the whole image: the transform reads :class:`RGBPixels` by blocks
    instead. The array may be read-only (Pillow's buffer): copy it before writing into it."""
    values = RGBPixels(img).rows(0, img.height)
    return values if values.flags.c_contiguous else np.ascontiguousarray(values)
