"""The transform: RGB pixels to the network's input, exactly as the original Illustration2Vec did.

Golden spec steps 2-3: resize to the network's input size the way ``caffe.io.resize_image`` does with
today's scikit-image (min-max normalisation, Gaussian anti-aliasing with zero padding, bilinear sampling at
pixel centres, clipping), then BGR minus the mean. Decoding (step 1) is :mod:`i2v_cli.decode`'s job.

The resize is reproduced without scikit-image or scipy: per axis, the blur and the bilinear sampling are
both linear with zero padding, so together they are one banded (out x in) matrix, in float64, made a few
rows at a time. The pixels are read once, a strip of rows at a time, straight from the decoded image (no
copy of it is made), and the pass order keeps every intermediate small (see :func:`resize_pixels`), so
memory beyond the decoded image stays a few tens of megabytes for an 81-megapixel or a 1 x 1,000,000
image. Everything here is a plain function of its arguments (no global state is changed), so it is safe in
threads and DataLoader workers.

It is NumPy only: torch is imported by the functions that return tensors (``resize_pixels``, ``preprocess``,
``load_and_preprocess``), which wrap their ``*_array`` twins without a copy. So a run whose network is an ONNX
Runtime session preprocesses without importing torch (about 1 CPU-second), and computes the very same values
as one with torch: there is only one implementation.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np
from PIL import Image

from .config import INPUT_SIZE, MEAN_BGR
from .decode import PathType, RGBPixels, decode_image, open_image
from .errors import ImageArrayError

if TYPE_CHECKING:
    import torch

__all__ = [
    "ArrayPixels",
    "Pixels",
    "load_and_preprocess",
    "load_network_input",
    "network_input_array",
    "preprocess",
    "preprocess_array",
    "resize_array",
    "resize_like_caffe",
    "resize_pixels",
    "to_network_input",
]

#: Largest float chunk (bytes) the resize converts at once; one row's support may exceed it.
_CHUNK_BYTES = 16 * 1024 * 1024
#: Longest band (inputs per output) that the H pass sums in float32: beyond it (images over about 3,700 rows for
#: 224 outputs) float64, as summing thousands of terms in float32 moved a 100,000 x 1 image's values by 3e-4 (measured
#: against scikit-image; 3e-5 in float64).
_LONG_BAND = 64
#: Largest intermediate (size, W, 3) float32 result of resizing along H first; wider images are resized
#: along W first, a strip of rows at a time (a 1 x 1,000,000 image took 2.7 GB here before).
_MAX_INTERMEDIATE = 32 * 1024 * 1024


class Pixels(Protocol):
    """Pixels that the resize reads a strip of rows at a time (see :class:`ArrayPixels` and
    :class:`~i2v_cli.decode.RGBPixels`)."""

    height: int
    width: int
    #: The blocks' dtype. uint8 blocks are resized as they are read (exact in float32); others have their
    #: minimum subtracted first, which keeps the precision of float values in any range.
    dtype: np.dtype

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``: a (stop - start, width, 3) array."""
        ...

    def extrema(self) -> tuple[float, float] | None:
        """The smallest and largest value over the whole image (all three channels), or None when they are
        not known before reading (uint8 blocks only: the resize then finds them as it reads)."""
        ...


class ArrayPixels:
    """An (H, W, 3) array as :class:`Pixels` (a view is fine: nothing is copied whole). Each block goes
    through ``convert``, an elementwise, non-decreasing map (such as 16-bit to 8-bit) when one is given;
    an (H, W, 1) array with ``grey`` gives its one channel three times."""

    def __init__(
        self, arr: np.ndarray, convert: Callable[[np.ndarray], np.ndarray] | None = None, grey: bool = False
    ) -> None:
        self.arr = arr
        self.height, self.width = arr.shape[:2]
        self.convert = convert
        self.grey = grey
        self._ends = np.array([arr.min(), arr.max()], dtype=arr.dtype)
        if convert is not None:
            self._ends = convert(self._ends)
        self.dtype = self._ends.dtype

    def _out(self, block: np.ndarray) -> np.ndarray:
        if self.convert is not None:
            block = self.convert(block)
        return np.repeat(block, 3, axis=2) if self.grey else block

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._out(self.arr[start:stop])

    def extrema(self) -> tuple[float, float]:
        return float(self._ends[0]), float(self._ends[1])


# --------------------------------------------------------------------------------------------------------
# Step 2: the resize of caffe.io.resize_image (scikit-image order=1, mode="constant", anti-aliased)


class _Axis(NamedTuple):
    """One axis of the resize, small whatever the axis' length: the weights are made a few rows at a time."""

    n_in: int
    n_out: int
    starts: np.ndarray  # first input index of each output's band
    base: np.ndarray  # floor of each output's sampling coordinate
    frac: np.ndarray  # its fractional part
    padded: np.ndarray  # the Gaussian kernel with a zero at each end
    radius: int
    width: int  # band width: inputs per output


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int) -> _Axis:
    """The Gaussian prefilter (sigma = max(0, (in/out - 1) / 2), radius int(4 sigma + 0.5), zero padding)
    and the bilinear sampling at ``(i + 0.5) * in / out - 0.5`` (zero outside) of one axis, in float64."""
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
    frac = coord - base
    base = base.astype(np.int64)
    width = min(n_in, 2 * radius + 2)
    starts = np.clip(base - radius, 0, n_in - width)
    padded = np.concatenate([[0.0], kernel, [0.0]])  # padded[t + radius + 1] = kernel[t], zero outside
    for arr in (starts, base, frac, padded):
        arr.setflags(write=False)
    return _Axis(n_in, n_out, starts, base, frac, padded, radius, width)


def _weight_rows(axis: _Axis, i0: int, i1: int) -> np.ndarray:
    """Rows ``i0:i1`` of the axis' banded matrix, (i1 - i0, width) float64: input ``starts[i] + j`` (always
    inside the image: zero padding) at distance t from ``base[i]`` gets (1 - frac) kernel[t] + frac
    kernel[t - 1]."""
    t = (axis.starts[i0:i1] - axis.base[i0:i1])[:, None] + np.arange(axis.width)[None, :]
    f = axis.frac[i0:i1, None]
    last = len(axis.padded) - 1
    return (1.0 - f) * axis.padded[np.clip(t + axis.radius + 1, 0, last)] + f * axis.padded[
        np.clip(t + axis.radius, 0, last)
    ]


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """The per-axis resize as a banded matrix: row i is ``weights[i]`` placed at columns ``starts[i]...``
    (the whole matrix at once; the resize makes it by blocks when it would be large)."""
    axis = _axis(n_in, n_out)
    return axis.starts, _weights_of(axis, 0, n_out)


@functools.lru_cache(maxsize=32)
def _small_weights(n_in: int, n_out: int) -> np.ndarray:
    weights = _weight_rows(_axis(n_in, n_out), 0, n_out)
    weights.setflags(write=False)
    return weights


def _weights_of(axis: _Axis, i0: int, i1: int) -> np.ndarray:
    """Rows ``i0:i1`` of the matrix: from a cached whole matrix when it is small (at most 8 MB)."""
    if axis.n_out * axis.width <= 1 << 20:
        return _small_weights(axis.n_in, axis.n_out)[i0:i1]
    return _weight_rows(axis, i0, i1)


def _row_sums(n_in: int, n_out: int) -> np.ndarray:
    """Each output's total weight (1 inside, less where the band reaches past the image's edge)."""
    axis = _axis(n_in, n_out)
    step = max(1, (1 << 18) // axis.width)
    return np.concatenate([_weights_of(axis, i, min(n_out, i + step)).sum(axis=1) for i in range(0, n_out, step)])


def _band_blocks(n_in: int, n_out: int, step: int, dtype: type) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """The matrix of :func:`_axis_weights` cut along its input axis every ``step`` rows: for each cut
    ``(k0, k1, i0, i1, block)``, the output rows ``i0:i1`` whose band reaches inputs ``k0:k1``, and the
    dense (i1 - i0, k1 - k0) block of weights (empty when no band reaches them)."""
    axis = _axis(n_in, n_out)
    starts, width = axis.starts, axis.width
    ends = starts + width
    taps = np.arange(width)
    for k0 in range(0, n_in, step):
        k1 = min(n_in, k0 + step)
        i0 = int(np.searchsorted(ends, k0, side="right"))  # first output row whose band ends after k0
        i1 = max(i0, int(np.searchsorted(starts, k1, side="left")))  # past the last one that starts before k1
        cols = (starts[i0:i1] - k0)[:, None] + taps[None, :]
        r, c = np.nonzero((cols >= 0) & (cols < k1 - k0))
        block = np.zeros((i1 - i0, k1 - k0), dtype=dtype)
        block[r, cols[r, c]] = _weights_of(axis, i0, i1)[r, c]
        yield k0, k1, i0, i1, block


#: Largest set of band blocks (bytes) kept for the next image of the same height: a few hundred KB for usual sizes.
_BLOCKS_CACHE_BYTES = 4 * 1024 * 1024


@functools.lru_cache(maxsize=32)
def _cached_band_blocks(
    n_in: int, n_out: int, step: int, dtype: type
) -> tuple[tuple[int, int, int, int, np.ndarray], ...] | None:
    """:func:`_band_blocks`, kept (read-only) for the next image of the same size (building them took about a
    tenth of a resize); None when they would take more than ``_BLOCKS_CACHE_BYTES``."""
    blocks, size = [], 0
    for k0, k1, i0, i1, block in _band_blocks(n_in, n_out, step, dtype):
        size += block.nbytes
        if size > _BLOCKS_CACHE_BYTES:
            return None
        block.setflags(write=False)
        blocks.append((k0, k1, i0, i1, block))
    return tuple(blocks)


#: Largest m * n * k of one matrix product: under OpenBLAS's threshold for using more than one thread (2**19), so
#: a resize runs on the thread that calls it, as a DataLoader worker or the reader thread expects. Two OpenBLAS
#: threads took 3-4 times the CPU time of one on a busy 2-core machine (measured), and the result does not
#: depend on the split (each output is summed over the same k, in the same order).
_PRODUCT_MNK = (1 << 19) - 1


def _add_product(out: np.ndarray, a: np.ndarray, b: np.ndarray, offset: float = 0.0, transposed: bool = False) -> None:
    """``out += a @ (b - offset)`` in ``a``'s float type, in slices small enough to run single-threaded (see
    :data:`_PRODUCT_MNK`); ``b`` (pixels, say) is converted to float a slice at a time, so no float copy of it
    is made whole. With ``transposed``, ``out`` holds the transpose: ``out += ((b - offset).T @ a.T)``."""
    (m, k), n = a.shape, b.shape[1]
    dtype = a.dtype.type

    def floats(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=dtype)
        return x - dtype(offset) if offset else x  # a new array when offset: never the caller's pixels

    if transposed:  # BLAS reads both transposes as they lie: no copy
        step = max(1, _PRODUCT_MNK // max(1, m * k))
        for j in range(0, n, step):
            out[j : j + step] += floats(b[:, j : j + step]).T @ a.T
    elif n >= m:
        step = max(1, _PRODUCT_MNK // max(1, m * k))
        for j in range(0, n, step):
            out[:, j : j + step] += a @ floats(b[:, j : j + step])
    else:
        b = floats(b)
        step = max(1, _PRODUCT_MNK // max(1, k * n))
        for i in range(0, m, step):
            out[i : i + step] += a[i : i + step] @ b


def _band_width(n_in: int, n_out: int) -> int:
    return _axis(n_in, n_out).width


def _apply_axis0(
    read: Callable[[int, int], np.ndarray],
    n_in: int,
    n_out: int,
    offset: float,
    out: np.ndarray,
    row_bytes: int,
    transposed: bool = False,
) -> None:
    """``out = A @ (x - offset)`` along axis 0 of ``x`` (n_in, ...), A from _axis_weights, chunk by chunk
    (with ``transposed``, ``out`` receives its transpose: (columns, n_out)).

    ``read(k0, k1)`` gives input rows ``k0:k1`` (any array whose rows flatten to ``out.shape[1]`` values);
    every row is read once, in order. Rows are taken a few at a time, about ``_CHUNK_BYTES`` when each costs
    ``row_bytes`` as floats, and added into the output rows whose band reaches them, converted to ``out.dtype``
    a slice at a time (:func:`_add_product`).
    """
    np_dtype = out.dtype.type
    # About three bands' worth of input rows per step: fewer wasted multiply-adds than larger steps,
    # less per-step overhead than smaller ones (measured).
    step = max(1, min(_CHUNK_BYTES // max(1, row_bytes), 3 * _band_width(n_in, n_out)))
    out.fill(0)
    blocks = _cached_band_blocks(n_in, n_out, step, np_dtype) or _band_blocks(n_in, n_out, step, np_dtype)
    for k0, k1, i0, i1, weights in blocks:
        source = read(k0, k1)
        if i0 == i1:
            continue
        source = np.asarray(source).reshape(k1 - k0, -1)
        if transposed:
            _add_product(out[:, i0:i1], weights, source, offset, transposed=True)
        else:
            _add_product(out[i0:i1], weights, source, offset)


class _RowResizer:
    """Strips of rows (k, W, 3) resized along W to (k, size * 3) float64: the first pass of a very wide
    image (in float64: a long band summed in float32 loses digits, and this path is rare).

    The strip is converted to float as it lies, (k, W * 3), and each block of the banded matrix is applied
    as ``kron(block.T, I3)``, which keeps the three channels apart: three times the multiply-adds of a
    transposed layout, but no transposing copies, and faster (measured). The blocks are made once per
    image, unless the image is so wide that they would take more than a chunk.
    """

    def __init__(self, w: int, size: int, offset: float) -> None:
        self.w, self.size, self.offset = w, size, float(offset)
        # Three bands' worth of columns per block, fewer when that would make a block's kron over 1 MB
        # (a band is about four output spacings wide: a block reaches step / spacing + 6 outputs).
        spacing = w / size
        self.step = 3 * _band_width(w, size)
        while self.step > 1 and 72 * self.step * (self.step / spacing + 6) > 1 << 20:
            self.step //= 2
        blocks_bytes = 72 * w * (self.step / spacing + 6)
        self.blocks = list(self._blocks()) if blocks_bytes <= _CHUNK_BYTES else None

    def _blocks(self) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
        eye = np.eye(3)
        for c0, c1, j0, j1, block in _band_blocks(self.w, self.size, self.step, np.float64):
            if j0 < j1:
                yield c0 * 3, c1 * 3, j0 * 3, j1 * 3, np.kron(block.T, eye)

    def __call__(self, strip: np.ndarray) -> np.ndarray:
        k = strip.shape[0]
        x = np.asarray(strip, dtype=np.float64, order="C").reshape(k, self.w * 3)  # the float copy
        if self.offset:
            x = x - self.offset  # a new array: never the caller's pixels
        if self.w == self.size:
            return x  # the identity (exact)
        y = np.zeros((k, self.size * 3), dtype=np.float64)
        for c0, c1, j0, j1, weights in self.blocks or self._blocks():
            _add_product(y[:, j0:j1], x[:, c0:c1], weights)
        return y


class _StripReader:
    """Rows ``k0:k1`` on demand (in order, each call starting where the last one stopped), read a strip of
    ``strip_rows`` at a time and passed through ``then``: a few large reads (and, for a very wide image, a
    few large W-pass products) rather than one per chunk of the H pass."""

    def __init__(
        self,
        rows: Callable[[int, int], np.ndarray],
        h: int,
        strip_rows: int,
        then: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.rows, self.h, self.strip_rows, self.then = rows, h, max(1, strip_rows), then
        self.start, self.done = 0, np.empty((0,))

    def __call__(self, k0: int, k1: int) -> np.ndarray:
        if k1 > self.start + len(self.done):
            end = min(self.h, max(k1, k0 + self.strip_rows))
            strip = self.rows(k0, end)
            self.start, self.done = k0, strip if self.then is None else self.then(strip)
        return self.done[k0 - self.start : k1 - self.start]


class _Extrema:
    """The smallest and largest value of the blocks seen."""

    def __init__(self) -> None:
        self.lo, self.hi = np.inf, -np.inf

    def see(self, block: np.ndarray) -> np.ndarray:
        if block.size:
            self.lo, self.hi = min(self.lo, float(block.min())), max(self.hi, float(block.max()))
        return block


def resize_pixels(pixels: Pixels, size: int = INPUT_SIZE) -> torch.Tensor:
    """:func:`resize_array` as a tensor (the same memory)."""
    import torch

    return torch.from_numpy(resize_array(pixels, size))


def resize_array(pixels: Pixels, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize to (size, size, 3) float32 exactly as the release's ``caffe.io.resize_image`` (spec step 2; see
    :func:`_resized`)."""
    return _resized(pixels, size).astype(np.float32, order="C")


def _resized(pixels: Pixels, size: int) -> np.ndarray:
    """The resize of :func:`resize_array` in float64, indexed (row, column, channel): often a transposed view of
    (column, channel, row) memory, which the caller converts in the same pass as it lays it out for its use.

    Min-max normalise over the whole image, anti-alias and bilinear-sample as scikit-image's
    ``resize(order=1, mode="constant")`` does, clip to [0, 1], scale back. The pixels are read once, a strip
    of rows at a time. Both passes are linear, so their order changes only rounding: along H first (into the
    transposed (W * 3, size), float32) then along W (float64) is the faster order, but for an image so wide that
    this intermediate would exceed 32 MB, each strip is resized along W first and added along H into the result
    (both float64), so that memory stays bounded by the image whatever its shape.
    """
    size = int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    h, w = pixels.height, pixels.width
    if h <= 0 or w <= 0:
        raise ImageArrayError(f"cannot resize an empty image of {h}x{w} pixels")
    bounds = pixels.extrema()
    if bounds is not None:
        lo, hi = bounds
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageArrayError("the image holds NaN or infinite values")
        if hi == lo:
            return np.full((size, size, 3), lo, dtype=np.float64)
    # uint8 blocks are taken as they are (exact in float32; the same rounding whether they come from an
    # array or a decoded image) and the minimum is subtracted at the end; other values have it subtracted
    # first, so that float values in any range keep their precision.
    if pixels.dtype != np.uint8 and bounds is None:
        raise ValueError("Pixels whose blocks are not uint8 must know their extrema")
    offset = bounds[0] if pixels.dtype != np.uint8 else 0.0
    seen = _Extrema()
    rows = pixels.rows if bounds is not None else (lambda a, b: seen.see(pixels.rows(a, b)))
    if size * w * 3 * 4 <= _MAX_INTERMEDIATE:
        # Along H from the pixels (float32) into (size, W, 3), then along W (float64): the faster order
        # (contiguous strips, measured), unless the image is so wide that (size, W, 3) would be large.
        if h == size:
            first = np.array(rows(0, h), dtype=np.float64) - offset  # the identity: skipped (exact)
            result = _resize_axis1(first, size)
        else:
            # The H pass writes its transpose, (W * 3, size): read as (W, 3 * size), it is the W pass's input
            # as it lies, so no transposing copy of the intermediate is made (that copy took a quarter of a
            # resize, measured); the small (size, 3, size) result is laid out by the caller's conversion.
            # float32, unless the band is so long (a very tall image) that its sum in float32 loses digits.
            inter = np.float64 if _band_width(h, size) > _LONG_BAND else np.float32
            tmp = np.empty((w * 3, size), dtype=inter)
            strips = _StripReader(rows, h, _CHUNK_BYTES // (w * 3 * 4))  # uint8 strips: a quarter of that
            _apply_axis0(strips, h, size, offset, tmp, row_bytes=w * 3 * tmp.itemsize, transposed=True)
            first = tmp.reshape(w, 3 * size)
            res = np.empty((size, 3 * size), dtype=np.float64)
            _apply_axis0(lambda a, b: first[a:b], w, size, 0.0, res, row_bytes=3 * size * 8)
            result = res.reshape(size, 3, size).transpose(2, 0, 1)
    else:
        # Very wide: each strip of rows along W, then added along H into the result (float64).
        result = np.empty((size, size * 3), dtype=np.float64)
        strips = _StripReader(rows, h, _CHUNK_BYTES // (w * 3 * 8), then=_RowResizer(w, size, offset))
        _apply_axis0(strips, h, size, 0.0, result, row_bytes=size * 24)
        result = result.reshape(size, size, 3)
    if bounds is None:
        lo, hi = seen.lo, seen.hi
    if lo != offset:  # A (x - lo) B^T = A (x - offset) B^T - (lo - offset) (A 1)(B 1)^T: the row sums
        result -= (lo - offset) * np.outer(_row_sums(h, size), _row_sums(w, size))[:, :, None]
    # (y - lo) / (hi - lo) clipped to [0, 1], times (hi - lo), plus lo.
    np.clip(result, 0.0, hi - lo, out=result)
    result += lo
    return result


def _resize_axis1(first: np.ndarray, size: int) -> np.ndarray:
    """(size, n, 3) float to (size, size, 3) float64 along axis 1, a band of rows at a time."""
    n = first.shape[1]
    if n == size:
        return np.array(first, dtype=np.float64)  # a copy, not the caller's
    result = np.empty((size, size, 3), dtype=np.float64)
    # A quarter chunk of rows at a time: beside ``first`` (up to 32 MB), the transposed copy stays small.
    band = max(1, min(size, _CHUNK_BYTES // 4 // max(1, n * 3 * 8)))
    for r0 in range(0, size, band):
        r1 = min(size, r0 + band)
        # Transpose the band to (n, rows * 3), apply the matrix, write back.
        part = np.ascontiguousarray(first[r0:r1].transpose(1, 0, 2), dtype=np.float64).reshape(n, -1)
        res = np.empty((size, (r1 - r0) * 3), dtype=np.float64)
        _apply_axis0(lambda a, b, part=part: part[a:b], n, size, 0.0, res, row_bytes=(r1 - r0) * 3 * 8)
        result[r0:r1] = res.reshape(size, r1 - r0, 3).transpose(1, 0, 2)
        del part, res  # before the next band's are made
    return result


def _is_tensor(obj: object) -> bool:
    """Whether ``obj`` is a torch tensor, known without importing torch (a tensor means torch is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _as_hwc_array(arr: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = _tensor_to_numpy(arr) if _is_tensor(arr) else np.asarray(arr)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageArrayError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageArrayError(f"cannot resize an empty image of shape {arr.shape}")
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageArrayError(f"expected integer or float pixels, got {arr.dtype}")
    return arr


def _tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16; float32 holds both exactly
        t = t.to(torch.float32)
    return t.numpy()


def resize_like_caffe(arr: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize (H, W, 3) pixel values to (size, size, 3) float32 exactly as the release's
    ``caffe.io.resize_image`` (see :func:`resize_pixels`). Values are taken as they are, in any range; the
    array is read in blocks, so no float copy of the whole image is made. ImageArrayError (a ValueError)
    for a wrong shape, type, NaN or infinity."""
    return resize_pixels(ArrayPixels(_as_hwc_array(arr)), size)


# --------------------------------------------------------------------------------------------------------
# Step 3 and the whole pipeline

_MEAN_BGR = np.array(MEAN_BGR, dtype=np.float32).reshape(3, 1, 1)


def to_network_input(rgb: torch.Tensor) -> torch.Tensor:
    """(size, size, 3) RGB on 0-255 to the network's (3, size, size) float32 BGR minus the mean (step 3), on the
    tensor's device."""
    import torch

    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB tensor, got shape {tuple(rgb.shape)}")
    bgr = rgb.to(torch.float32).flip(2).permute(2, 0, 1)
    return (bgr - torch.from_numpy(_MEAN_BGR).to(bgr.device)).contiguous()


def network_input_array(rgb: np.ndarray) -> np.ndarray:
    """:func:`to_network_input` of a NumPy (size, size, 3) RGB array: the same float32 values, without torch."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    bgr = rgb.astype(np.float32, copy=False)[:, :, ::-1].transpose(2, 0, 1)
    return np.subtract(bgr, _MEAN_BGR, out=np.empty(bgr.shape, dtype=np.float32))


def _network_input(pixels: Pixels) -> np.ndarray:
    """``network_input_array(resize_array(pixels))``, the same values, with one conversion of the resize's result
    in its own memory order rather than a transposing copy then another."""
    return network_input_array(_resized(pixels, INPUT_SIZE).astype(np.float32, order="K"))


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """16-bit values to their top 8 bits, as a 16-bit grey image (Pillow's I;16) is decoded."""
    return (values.astype(np.uint16, copy=False) >> 8).astype(np.uint8)


def _array_pixels(image: np.ndarray | torch.Tensor) -> ArrayPixels:
    """An array or tensor given as an image, checked by the rule of :func:`preprocess`."""
    arr = _tensor_to_numpy(image) if _is_tensor(image) else np.asarray(image)
    shape = arr.shape
    if arr.ndim == 2:
        arr = arr[:, :, None]
    grey = arr.ndim == 3 and arr.shape[2] == 1  # its one channel is repeated a block at a time
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha dropped, no compositing: a view
    elif not (arr.ndim == 3 and arr.shape[2] in (1, 3)):
        raise ImageArrayError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {shape}"
            + (" (channels first? use .permute(1, 2, 0))" if arr.ndim == 3 and shape[0] in (1, 3, 4) else "")
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageArrayError(f"cannot preprocess an empty image of shape {shape}")
    dtype = arr.dtype
    if dtype == np.uint8:
        return ArrayPixels(arr, grey=grey)
    if dtype == np.uint16:
        return ArrayPixels(arr, _sixteen_to_eight, grey=grey)
    if np.issubdtype(dtype, np.integer) and dtype != np.bool_:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageArrayError(
                f"{dtype} pixels must lie within 0-255, found {lo} to {hi}: pass uint8 (0-255) or uint16 "
                "(0-65535) values"
            )
        return ArrayPixels(arr, grey=grey)
    if np.issubdtype(dtype, np.floating):
        lo, hi = float(arr.min()), float(arr.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ImageArrayError("the image holds NaN or infinite values")
        if lo < 0.0 or hi > 255.0:
            raise ImageArrayError(
                f"float pixels must lie within 0-255, found {lo:g} to {hi:g} (normalised values? undo the "
                "normalisation, or clip to 0-255)"
            )
        if hi <= 1.0:
            raise ImageArrayError(
                f"float pixels must be on a 0-255 scale, but all lie within 0-1 ({lo:g} to {hi:g}): multiply by 255"
            )
        return ArrayPixels(arr)
    raise ImageArrayError(f"expected uint8, uint16 or float pixels, got {dtype}")


def preprocess(image: Image.Image | np.ndarray | torch.Tensor) -> torch.Tensor:
    """:func:`preprocess_array` as a tensor (the same memory)."""
    import torch

    return torch.from_numpy(preprocess_array(image))


def preprocess_array(image: Image.Image | np.ndarray | torch.Tensor) -> np.ndarray:
    """One image to the network's (3, size, size) float32 input: spec steps 1-3 (size from
    :data:`~i2v_cli.config.INPUT_SIZE`).

    A PIL image is decoded as an image file is (:func:`~i2v_cli.decode.decode_image`: its EXIF orientation
    applied, its mode giving its scale), so ``preprocess(Image.open(path))`` equals
    ``load_and_preprocess(path)``. An array or tensor is (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA
    (alpha dropped) pixel values, by one rule:

    - uint8: 0-255, as they are.
    - uint16: 0-65535, reduced to their top 8 bits as a 16-bit image file is.
    - other integer types: must lie within 0-255.
    - float (any precision): must lie within 0-255; an array whose values all lie within 0-1 is refused as
      ambiguous (multiply by 255), as are negative values (normalised input), values over 255, NaN and
      infinity.

    Anything else raises ImageArrayError (a ValueError) saying what to pass; a PIL image that cannot be
    decoded raises ImageDecodeError.
    """
    if isinstance(image, Image.Image):
        pixels: Pixels = RGBPixels(decode_image(image))
    else:
        pixels = _array_pixels(image)
    return _network_input(pixels)


def load_and_preprocess(path: PathType) -> torch.Tensor:
    """Decode an image file and return its (3, size, size) network input; ImageDecodeError if it is bad."""
    import torch

    return torch.from_numpy(load_network_input(path))


def load_network_input(path: PathType) -> np.ndarray:
    """:func:`load_and_preprocess` as a NumPy array, without torch."""
    return _network_input(RGBPixels(open_image(path)))
