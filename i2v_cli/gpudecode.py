"""The reader stage on a GPU (``--decode cuda``): JPEG files decoded by nvJPEG and resized exactly on the GPU.

On a GPU machine the CPU's decoding bounds a run: on an H100 with 16 cores, i2v's exact CPU decoding and resize
of mixed-size JPEG files gave a few hundred images a second, the network in bf16 over ten thousand. Here the
files are read in threads, their headers checked with Pillow (no pixels decoded), the JPEGs decoded in batches
by nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``) and resized by the spec's resize as two matrix
products per image size (the banded matrices of :mod:`i2v_cli.transform`, in float32).

It is opt-in: nvJPEG's IDCT and chroma upsampling are not libjpeg's, so colour pixels differ by a fraction of a
level to a few on average (more at sharp colour edges; grey JPEGs are equal) and scores move as they do with
bf16; the CPU decoding stays the reference. Every file that nvJPEG should not decode goes to i2v's CPU decoding,
with its exact values and error messages (crash-isolated in a worker process): not a JPEG, CMYK, an EXIF
orientation to apply, no end marker (truncated), over :data:`MAX_GPU_PIXELS`, unreadable, or refused by nvJPEG.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from .batches import Batch, decode_sample
from .config import INPUT_SIZE, MEAN_BGR
from .errors import I2VError

#: Images larger than this go to the CPU, whose resize keeps memory bounded whatever the size.
MAX_GPU_PIXELS = 40_000_000
#: Pixels decoded by one nvJPEG call, and resized by one product: bounds the GPU memory a batch takes.
_PIXELS_PER_CALL = 256_000_000
_RESIZE_BYTES = 1 << 30

#: A decoder of JPEG bytes: a (3, H, W) uint8 RGB tensor on the device for each, or None where it failed.
Decoder = Callable[[list[torch.Tensor]], list["torch.Tensor | None"]]


def gpu_decoding_available() -> str | None:
    """None when ``--decode cuda`` can run here, else what is missing, in words."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible to PyTorch"
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return "torchvision is not installed (pip install torchvision, matching your torch)"
    return None


def nvjpeg_decoder(device: torch.device) -> Decoder:
    """nvJPEG through torchvision: one batched call, and where it fails (one bad file fails the call), each file
    on its own so that only the bad ones fall back."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            pass
        out: list[torch.Tensor | None] = []
        for data in datas:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out

    return decode


def jpeg_for_gpu(path: str) -> tuple[bytes, tuple[int, int]] | None:
    """A file's bytes and (height, width) when nvJPEG may decode it as i2v would (a complete baseline or
    progressive RGB or grey JPEG, upright, not too large); None for any other file, which then goes to the CPU
    decoding (and gets its exact error message there if it is bad). Reads the header only."""
    from .decode import exif_orientation

    try:
        with open(path, "rb") as fp:
            data = fp.read()
    except OSError:
        return None
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or truncated: Pillow's error, not nvJPEG's guess
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None  # CMYK, YCCK, MPO: Pillow's colours
            width, height = img.size
            if not 0 < width * height <= MAX_GPU_PIXELS or exif_orientation(img) != 1:
                return None
    except Exception:  # anything Pillow says about the header: the CPU path says it properly
        return None
    return data, (height, width)


class GpuResize:
    """The spec's resize (:func:`i2v_cli.transform.resize_array`) on a device: per axis the same banded matrix,
    made dense once per input length, applied as a batched product to the images of one size."""

    def __init__(self, device: torch.device, size: int = INPUT_SIZE) -> None:
        self.device, self.size = device, size
        self._matrices: dict[int, torch.Tensor] = {}
        self._mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def _matrix(self, n_in: int) -> torch.Tensor:
        from .transform import _axis_weights

        if n_in not in self._matrices:
            dense = np.zeros((self.size, n_in))
            if n_in == self.size:
                dense = np.eye(n_in)  # the identity, skipped by the CPU path too (exact)
            else:
                starts, weights = _axis_weights(n_in, self.size)
                for i, (start, row) in enumerate(zip(starts, weights, strict=True)):
                    dense[i, start : start + len(row)] = row
            self._matrices[n_in] = torch.from_numpy(dense).to(self.device, torch.float32)
        return self._matrices[n_in]

    def same_size(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) uint8 RGB images of one size to (N, 3, S, S) network inputs (BGR minus the mean)."""
        x = images.float()
        lo, hi = x.amin(dim=(1, 2, 3), keepdim=True), x.amax(dim=(1, 2, 3), keepdim=True)
        # In the process's float32 mode, IEEE unless the network runs in tf32 (whose switch, set around each of
        # its calls in another thread, is not changed from here).
        y = self._matrix(x.shape[2]) @ (x - lo) @ self._matrix(x.shape[3]).T
        y = torch.where(hi > lo, torch.minimum(y.clamp_min(0), hi - lo) + lo, lo.expand_as(y))
        return y.flip(1) - self._mean

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) uint8 images of any sizes, in order, to one (N, 3, S, S) batch: one product per size, each
        bounded in memory."""
        out = torch.empty(len(images), 3, self.size, self.size, device=self.device)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(tuple(img.shape[1:]), []).append(i)
        for (h, w), members in groups.items():
            step = max(1, _RESIZE_BYTES // (3 * h * w * 4))
            for start in range(0, len(members), step):
                part = members[start : start + step]
                out[part] = self.same_size(torch.stack([images[i] for i in part]))
        return out


def gpu_batches(
    paths: Sequence[str],
    *,
    batch_size: int,
    device: torch.device,
    workers: int = 0,
    decoder: Decoder | None = None,
) -> Iterator[Batch]:
    """Batches of ``paths`` in input order with their inputs on ``device``: JPEGs decoded by ``decoder`` (nvJPEG
    by default) and resized there, the other files decoded on the CPU as :func:`i2v_cli.data.iter_batches`
    does (in ``workers`` processes, or here with 0) and sent over. Made a batch or two ahead in a thread."""
    from .data import read_ahead

    decode = decoder or nvjpeg_decoder(device)
    resize = GpuResize(device)
    threads = ThreadPoolExecutor(8, thread_name_prefix="i2v-read")

    def produce(stop: threading.Event) -> Iterator[Batch]:
        try:
            for start in range(0, len(paths), batch_size):
                if stop.is_set():
                    return
                yield _one_batch(paths, range(start, min(start + batch_size, len(paths))))
        finally:
            threads.shutdown(wait=False, cancel_futures=True)

    def _one_batch(paths: Sequence[str], indices: range) -> Batch:
        probes = list(threads.map(lambda i: jpeg_for_gpu(paths[i]), indices))
        on_gpu = [(i, probe) for i, probe in zip(indices, probes, strict=True) if probe is not None]
        on_cpu = [i for i, probe in zip(indices, probes, strict=True) if probe is None]
        decoded: dict[int, torch.Tensor] = {}
        for chunk in _by_pixels(on_gpu):
            datas = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _, (data, _) in chunk]
            try:
                images = decode(datas)
            except torch.OutOfMemoryError:
                images = [None] * len(chunk)
            for (i, (_, shape)), image in zip(chunk, images, strict=True):
                if image is not None and tuple(image.shape) == (3, *shape):
                    decoded[i] = image
                else:
                    on_cpu.append(i)  # nvJPEG refused it, or made something else of it: the CPU decides
        inputs = dict(zip(decoded, resize(list(decoded.values())) if decoded else [], strict=True))
        cpu = _decode_on_cpu(paths, sorted(on_cpu), workers)
        for i, row in zip(cpu.ok, torch.as_tensor(cpu.inputs), strict=True):
            inputs[i] = row.to(device)
        ok = sorted(inputs)
        stacked = torch.stack([inputs[i] for i in ok]) if ok else torch.empty(0, device=device)
        return Batch(ok, stacked, cpu.errors)

    return read_ahead(produce)


def _by_pixels(items: list[tuple[int, tuple[bytes, tuple[int, int]]]]) -> Iterator[list]:
    """``items`` (index, (bytes, (h, w))) in runs of at most :data:`_PIXELS_PER_CALL` pixels (one at least)."""
    run: list = []
    pixels = 0
    for item in items:
        h, w = item[1][1]
        if run and pixels + h * w > _PIXELS_PER_CALL:
            yield run
            run, pixels = [], 0
        run.append(item)
        pixels += h * w
    if run:
        yield run


def _decode_on_cpu(paths: Sequence[str], indices: list[int], workers: int) -> Batch:
    """``paths[indices]`` decoded by i2v's CPU path: in a worker process (a decoder crash costs only its image)
    when ``workers`` > 0, else here; the Batch's positions are those of ``paths``."""
    if not indices:
        return Batch([], torch.empty(0), {})
    if workers > 0:
        from .data import decode_in_worker

        part = decode_in_worker([paths[i] for i in indices])
        return Batch(
            [indices[k] for k in part.ok],
            part.inputs,
            {indices[k]: error for k, error in part.errors.items()},
        )
    from .batches import stack_samples
    from .transform import load_and_preprocess

    return stack_samples([decode_sample(paths, i, load_and_preprocess) for i in indices])


def check_gpu_decoding(decode: str, device: torch.device) -> None:
    """Refuse ``--decode cuda`` where it cannot run, in one line that says what to do."""
    if decode == "cpu":
        return
    if decode != "cuda":
        raise I2VError(f"unknown --decode {decode!r}: use cpu or cuda")
    if device.type != "cuda":
        raise I2VError("--decode cuda decodes JPEG files on the GPU that runs the network: add --device cuda")
    missing = gpu_decoding_available()
    if missing is not None:
        raise I2VError(f"--decode cuda cannot run here: {missing}")
