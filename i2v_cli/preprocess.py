"""Turn an image file or array into the network's input, exactly as the original Illustration2Vec did.

The pipeline is the golden spec's steps 1-3: decode to RGB with the image's real colours, resize to
224x224 the way ``caffe.io.resize_image`` does with today's scikit-image (min-max normalisation, Gaussian
anti-aliasing with zero padding, bilinear sampling at pixel centres, clipping), then BGR minus the mean.

The resize is reproduced without scikit-image or scipy: per axis, the blur and the bilinear sampling are
both linear with zero padding, so together they are one banded (out x in) matrix, built once per size in
float64 and cached. An image is multiplied by it a few input rows at a time straight from its uint8
pixels, so even a 250-megapixel image never becomes a full float copy. Everything here is a plain
function of its arguments (no global state is changed), so it is safe in threads and DataLoader workers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import stat
import warnings
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import INPUT_SIZE, MEAN_BGR
from .errors import ImageDecodeError

__all__ = [
    "ImageDecodeError",
    "image_to_array",
    "load_and_preprocess",
    "open_image",
    "preprocess",
    "resize_like_caffe",
    "to_network_input",
]

PathType = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: Bytes that start files of formats people feed to taggers, to tell "a broken PNG" from "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)

#: Largest float chunk (bytes) the resize converts at once; one output row's support may exceed it.
_CHUNK_BYTES = 16 * 1024 * 1024


# --------------------------------------------------------------------------------------------------------
# Step 1: decoding


def _display(path: PathType) -> str:
    return os.fsdecode(os.fspath(path))


def _file_kind(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _looks_like_text(data: bytes) -> bool:
    if not data or b"\x00" in data:
        return False
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        # A multi-byte character cut at the end of the sample is still text.
        try:
            text = data[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return all(ch.isprintable() or ch in "\t\r\n\f\v" for ch in text)


def _check_file(path: PathType, name: str) -> os.stat_result:
    """Say in words why ``path`` is not a readable regular file, before Pillow gives a vaguer error."""
    try:
        lst = os.lstat(path)
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
        raise ImageDecodeError(f"{name}: is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(f"{name}: not a regular file (a device, pipe or socket), not an image")
    if st.st_size == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    return st


def _bomb_message(name: str, pixels: int | None, detail: str = "") -> str:
    if pixels is None:  # Pillow refused it before we saw its size: take the count from its message
        found = re.search(r"\((\d+) pixels\)", detail)
        pixels = int(found.group(1)) if found else None
    count = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
    return (
        f"{name}: {count}, over the limit of {Image.MAX_IMAGE_PIXELS:,}: refused as a possible decompression "
        "bomb (PIL.Image.MAX_IMAGE_PIXELS sets the limit)"
    )


def _open_loaded(fp, name: str) -> Image.Image:
    """Open and fully decode the first frame from an open binary file, raising ImageDecodeError."""
    head = fp.read(64)
    fp.seek(0)
    kind = _file_kind(head)
    with warnings.catch_warnings():
        # A bomb must be refused, not warned about. Scoped to this call; the explicit size check below
        # does the same job should another thread restore the warning filters meanwhile.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(_bomb_message(name, None, str(exc))) from None
        except UnidentifiedImageError:
            if kind is not None:
                msg = f"{name}: truncated or corrupt {kind} file (its header cannot be read)"
            elif _looks_like_text(head):
                msg = f"{name}: a text file, not an image"
            else:
                msg = f"{name}: not an image, or in a format Pillow cannot read (unknown file type)"
            raise ImageDecodeError(msg) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            what = f"{kind} file" if kind else "image file"
            if isinstance(exc, EOFError) or "truncat" in str(exc).lower():
                raise ImageDecodeError(f"{name}: truncated {what} (its header is cut short)") from None
            raise ImageDecodeError(f"{name}: corrupt {what}, its header cannot be read ({exc})") from None
        fmt = img.format or kind or "image"
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"{name}: the {fmt} file declares an empty size {width}x{height}")
        if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
            raise ImageDecodeError(_bomb_message(name, width * height))
        try:
            img.load()  # the first frame of an animation: Image.open is positioned on it
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(_bomb_message(name, None, str(exc))) from None
        except MemoryError:
            raise ImageDecodeError(f"{name}: {width}x{height} {fmt} image is too large for memory") from None
        except (OSError, EOFError) as exc:
            text = str(exc)
            if "truncated" in text or isinstance(exc, EOFError):
                raise ImageDecodeError(f"{name}: truncated {fmt} file ({text or 'unexpected end'})") from None
            raise ImageDecodeError(f"{name}: corrupt {fmt} data ({text})") from None
        except Exception as exc:  # Pillow plugins raise SyntaxError, ValueError, struct.error, ...
            raise ImageDecodeError(f"{name}: corrupt {fmt} file ({type(exc).__name__}: {exc})") from None
    with contextlib.suppress(Exception):  # unreadable EXIF: the pixels are fine, keep them as stored
        ImageOps.exif_transpose(img, in_place=True)
    return img


def open_image(path: PathType) -> Image.Image:
    """Open and fully decode an image file (first frame, EXIF orientation applied).

    Every failure (missing, empty, truncated, not an image, a decompression bomb, unreadable, ...)
    raises ImageDecodeError with a plain-words message naming the file, so a batch can skip just it.
    """
    name = _display(path)
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
            return _open_loaded(fp, name)
        except ImageDecodeError:
            raise
        except OSError as exc:  # a read error on the disk itself
            raise ImageDecodeError(f"{name}: cannot read the file ({exc.strerror or exc})") from None


def _scale_high_bit_depth(values: np.ndarray) -> np.ndarray:
    """Map 16-bit (or wider integer) grey levels to 0-255; values already within 0-255 are kept."""
    if values.size and values.max() <= 255 and values.min() >= 0:
        return values.astype(np.uint8)
    return (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _scale_float(values: np.ndarray) -> np.ndarray:
    """Map float grey levels to 0-255: images within [0, 1] are scaled by 255, others clipped to 0-255."""
    values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


#: Modes whose RGB conversion must go through another mode to keep their real colours.
_VIA = {"P": "RGBA", "PA": "RGBA", "RGBa": "RGBA", "La": "LA"}


def image_to_array(img: Image.Image) -> np.ndarray:
    """The image's pixels as (H, W, 3) uint8 RGB in their real colours, for any mode Pillow can convert.

    Alpha is dropped without compositing (as the original did); palette images go through RGBA; 16-bit
    grey keeps its top 8 bits; float grey in [0, 1] is scaled by 255. uint8 keeps huge images small.
    The array may be read-only (it is Pillow's buffer): copy it before writing into it.
    """
    mode = img.mode
    if mode == "RGB":
        rgb = img
    elif mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        grey = np.asarray(img).astype(np.uint16, copy=False) >> 8
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    elif mode == "I":
        grey = _scale_high_bit_depth(np.asarray(img))
        return np.repeat(grey[:, :, None], 3, axis=2)
    elif mode == "F":
        grey = _scale_float(np.asarray(img))
        return np.repeat(grey[:, :, None], 3, axis=2)
    elif mode in _VIA:
        # Palette colours (a transparent index keeps its colour), premultiplied alpha undone.
        rgb = img.convert(_VIA[mode]).convert("RGB")
    else:
        rgb = None
        for route in (("RGB",), ("RGBA", "RGB"), ("LA", "RGB")):  # L, LA, 1, RGBA, CMYK, YCbCr, HSV, ...
            try:
                rgb = img
                for target in route:
                    rgb = rgb.convert(target)
                break
            except (ValueError, OSError):
                rgb = None
        if rgb is None:
            raise ImageDecodeError(f"cannot convert a {mode} image to RGB")
    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:  # pragma: no cover - Pillow contract
        raise ImageDecodeError(f"converting a {mode} image gave {arr.dtype} {arr.shape}, not RGB")
    return arr


# --------------------------------------------------------------------------------------------------------
# Step 2: the resize of caffe.io.resize_image (scikit-image order=1, mode="constant", anti-aliased)


@functools.lru_cache(maxsize=32)
def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-axis resize as a banded matrix: row i is ``weights[i]`` placed at columns ``starts[i]...``.

    It is the Gaussian prefilter (sigma = max(0, (in/out - 1) / 2), radius int(4 sigma + 0.5), zero
    padding) followed by bilinear sampling at ``(i + 0.5) * in / out - 0.5`` (zero outside), in float64.
    """
    scale = n_in / n_out
    sigma = max(0.0, (scale - 1.0) / 2.0)
    if sigma > 1e-15:  # scipy.ndimage.gaussian_filter skips smaller sigmas
        radius = int(4.0 * sigma + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 / (sigma * sigma) * x * x)
        kernel /= kernel.sum()
    else:
        radius = 0
        kernel = np.ones(1)
    coord = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    base = np.floor(coord)
    frac = (coord - base)[:, None]
    base = base.astype(np.int64)
    # Input index base + t, t in [-radius, radius + 1], gets (1 - frac) * kernel[t] + frac * kernel[t - 1].
    taps = (1.0 - frac) * np.append(kernel, 0.0)[None, :] + frac * np.insert(kernel, 0, 0.0)[None, :]
    index = base[:, None] + np.arange(-radius, radius + 2)[None, :]
    taps[(index < 0) | (index >= n_in)] = 0.0
    width = min(n_in, 2 * radius + 2)
    starts = np.clip(base - radius, 0, n_in - width)
    weights = np.zeros((n_out, width))
    rows, cols = np.nonzero((index >= 0) & (index < n_in))
    weights[rows, index[rows, cols] - starts[rows]] = taps[rows, cols]
    starts.setflags(write=False)
    weights.setflags(write=False)
    return starts, weights


def _apply_axis0(x: np.ndarray, n_out: int, offset: float, out: torch.Tensor, budget: int = _CHUNK_BYTES) -> None:
    """``out = A @ (x - offset)`` along axis 0 of ``x`` (n_in, ...), A from _axis_weights, chunk by chunk.

    Input rows are taken a few at a time, each converted to ``out.dtype`` once (the only float copy, of
    at most ``budget`` bytes or one row), and added into the output rows whose band reaches them.
    """
    n_in = x.shape[0]
    starts, weights = _axis_weights(n_in, n_out)
    width = weights.shape[1]
    np_dtype = np.float64 if out.dtype == torch.float64 else np.float32
    row_bytes = max(1, x[0].size * np.dtype(np_dtype).itemsize)
    # About three bands' worth of input rows per step: fewer wasted multiply-adds than larger steps,
    # less per-step overhead than smaller ones (measured).
    step = max(1, min(budget // row_bytes, 3 * width))
    ends = starts + width
    taps = np.arange(width)
    out.zero_()
    for k0 in range(0, n_in, step):
        k1 = min(n_in, k0 + step)
        i0 = int(np.searchsorted(ends, k0, side="right"))  # first output row whose band ends after k0
        i1 = int(np.searchsorted(starts, k1, side="left"))  # past the last one that starts before k1
        if i0 >= i1:
            continue
        cols = (starts[i0:i1] - k0)[:, None] + taps[None, :]
        inside = (cols >= 0) & (cols < k1 - k0)
        r, c = np.nonzero(inside)
        block = np.zeros((i1 - i0, k1 - k0), dtype=np_dtype)
        block[r, cols[r, c]] = weights[i0 + r, c]
        chunk = np.asarray(x[k0:k1], dtype=np_dtype, order="C").reshape(k1 - k0, -1)
        if np.may_share_memory(chunk, x):  # float input of the right type: never touch the caller's pixels
            chunk = chunk.copy()
        if offset:
            chunk -= np_dtype(offset)
        out[i0:i1].addmm_(torch.from_numpy(block), torch.from_numpy(chunk))


def _as_hwc_array(arr: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(arr, torch.Tensor):
        arr = arr.detach().cpu().numpy()
    arr = np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot resize an empty image of shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"expected uint8 or float pixels, got {arr.dtype}")
    return arr


def resize_like_caffe(arr: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize (H, W, 3) pixels to (size, size, 3) float32 exactly as the release's ``caffe.io.resize_image``.

    Min-max normalise over the whole image, anti-alias and bilinear-sample as scikit-image's
    ``resize(order=1, mode="constant")`` does, clip to [0, 1], scale back (spec step 2). Works on uint8
    input in bounded memory: no float copy of the whole image is ever made.
    """
    x = _as_hwc_array(arr)
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    lo, hi = x.min(), x.max()
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("the image holds NaN or infinite values")
    if hi == lo:
        return torch.full((size, size, 3), lo, dtype=torch.float32)
    h, w = x.shape[:2]
    # The first (H) pass is the one over the whole image: float32, in chunks. The second works on a
    # (size, W, 3) intermediate and is done in float64, which costs little and keeps the error down.
    if h == size:
        rows: np.ndarray = x  # sampling at i + 0 with no blur: the identity, skip it (exact)
        offset = lo
    else:
        tmp = torch.empty((size, w * 3), dtype=torch.float32)
        _apply_axis0(x, size, lo, tmp)  # x may be a strided view (alpha sliced off): never copied whole
        rows = tmp.numpy().reshape(size, w, 3)
        offset = 0.0
    if w == size:
        result = torch.from_numpy(np.array(rows, dtype=np.float64)) - offset  # a copy, not the caller's
    else:
        result = torch.empty((size, size, 3), dtype=torch.float64)
        # Along W: transpose a band of rows to (W, rows * 3), apply the matrix, write back.
        band = max(1, min(size, _CHUNK_BYTES // max(1, w * 3 * 8)))
        for r0 in range(0, size, band):
            r1 = min(size, r0 + band)
            part = np.ascontiguousarray(rows[r0:r1].transpose(1, 0, 2), dtype=np.float64)
            res = torch.empty((size, (r1 - r0) * 3), dtype=torch.float64)
            _apply_axis0(part.reshape(w, -1), size, offset, res)
            result[r0:r1] = res.reshape(size, r1 - r0, 3).permute(1, 0, 2)
    # (y - lo) / (hi - lo) clipped to [0, 1], times (hi - lo), plus lo.
    return (result.clamp_(0.0, hi - lo) + lo).to(torch.float32)


# --------------------------------------------------------------------------------------------------------
# Step 3 and the whole pipeline

_MEAN_BGR = torch.tensor(MEAN_BGR, dtype=torch.float32).view(3, 1, 1)


def to_network_input(rgb224: torch.Tensor) -> torch.Tensor:
    """(224, 224, 3) RGB on 0-255 to the network's (3, 224, 224) float32 BGR minus the mean (step 3)."""
    if rgb224.ndim != 3 or rgb224.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB tensor, got shape {tuple(rgb224.shape)}")
    bgr = rgb224.to(torch.float32).flip(2).permute(2, 0, 1)
    return (bgr - _MEAN_BGR.to(bgr.device)).contiguous()


def _array_from(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, Image.Image):
        return image_to_array(image)
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped, no compositing
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {arr.shape}")
    return arr


def preprocess(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """A PIL image or an (H, W[, 1|3|4]) uint8/float 0-255 RGB array to the (3, 224, 224) network input.

    The whole of spec steps 1-3: RGB pixels, the Caffe resize, BGR minus the mean.
    """
    return to_network_input(resize_like_caffe(_array_from(image), INPUT_SIZE))


def load_and_preprocess(path: PathType) -> torch.Tensor:
    """Decode an image file and return its (3, 224, 224) network input; ImageDecodeError if it is bad."""
    img = open_image(path)
    arr = image_to_array(img)
    del img  # let the decoded image go before the resize when the conversion made a copy
    return to_network_input(resize_like_caffe(arr, INPUT_SIZE))
