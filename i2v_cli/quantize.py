"""``--precision int8``: the network in 8-bit integers on the CPU, quantised once from a calibration set.

The recipe, each step chosen by measurement on the golden models (numbers in bench/README.md):

1. A calibration set: :data:`CALIBRATION_COUNT` images at 224x224 after i2v's own exact resize, uint8 RGB.
   By default a deterministic synthetic set (:func:`synthetic_images`: gradients, grain, shapes, lines); better,
   the user's own illustrations, made once with ``i2v weights calibrate`` (:func:`images_from_files`).
2. Weights: int8, one symmetric scale per output channel, rounded by GPTQ (Frantar et al., 2022) rather than
   to nearest: column by column, each weight's rounding error is pushed onto the weights not yet rounded,
   weighted by the layer's input statistics on the calibration set. It is what makes int8 usable here: on the
   golden tag model, rounding to nearest alone moves 2.2% of the decisions at 0.5; GPTQ 0.4%.
3. Activations: uint8, one scale per tensor, from their minimum and maximum over the calibration set, after
   the channels of each ReLU output have been brought closer to one range (cross-layer equalisation: the channel
   is multiplied by sqrt(layer max / channel max), the next convolution's input divided by as much; the fp32
   network is unchanged). One scale per tensor otherwise spends most of its 256 steps on the widest channels:
   on the benchmark's feature network it takes the binary bits kept from 98.8% to 99.1%, and a network whose
   channels differ 8-fold in range from 94.5% to 98.6% (golden feature model). Clipping the range instead
   (percentiles, least squares) and bias correction did not help (bench/int8_probe.py).
4. ONNX Runtime's ``quantize_static`` writes the QDQ graph with our integers and scales, which ONNX Runtime
   runs with its int8 (VNNI) kernels. The result is cached like the ONNX export, keyed by the weights, the
   calibration set, the recipe and the library versions.

The feature network's ``encode1`` (a matrix-vector product per image) stays in fp32, in torch, on the model's weight.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import io
import logging
import math
import os
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_write, describe_oserror, write_bytes
from .config import CALIBRATION_COUNT, CALIBRATION_ENV, INPUT_SIZE, MEAN_BGR, TAG
from .errors import BackendWarning, CalibrationError, I2VError, WriteError, first_line
from .hashing import sha256_file
from .model import Illust2VecNet

#: Part of the cache key: change it when the recipe changes what is written.
RECIPE = "int8-gptq-equalized-sqrt16-minmax-2"
_SYNTH_SIZES = ((224, 224), (320, 240), (240, 320), (448, 448), (97, 131), (512, 384), (300, 300), (256, 640))
#: Version of :func:`synthetic_images`: the built-in set's cache key (change it when the drawing changes).
_SYNTH_VERSION = 1
#: GPTQ's damping, as a fraction of the mean diagonal of a layer's input second moments.
_DAMP = 0.01
#: Hessian columns (input patches) gathered per layer, at most, and at least this many times its width.
_MIN_COLUMNS, _COLUMNS_PER_INPUT = 16384, 4
#: The largest factor equalisation multiplies a channel by (one that nearly never fires is not blown up).
_MAX_EQUALIZATION = 16.0


# --------------------------------------------------------------------------------------------------------
# Calibration sets: uint8 (N, 224, 224, 3) RGB, as the exact resize gives them (rounded)


@functools.lru_cache(maxsize=2)
def synthetic_images(count: int = CALIBRATION_COUNT, seed: int = 0) -> np.ndarray:
    """``count`` deterministic synthetic illustrations, resized by i2v's own resize: uint8 (count, 224, 224, 3).

    Flat and gradient backgrounds with grain, filled ellipses, boxes and triangles, lines of several widths,
    some in greyscale; drawn at sizes from thumbnails to 640 pixels so the resize's blur is in them too. Read-only."""
    from PIL import Image, ImageDraw

    from .transform import resize_like_caffe

    rng = np.random.default_rng(seed)
    out = np.empty((count, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    for i in range(count):
        w, h = _SYNTH_SIZES[i % len(_SYNTH_SIZES)]
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0.0, 1.0, h)[:, None, None]
        base = top * (1 - t) + bottom * t + rng.normal(0.0, rng.uniform(0, 12), (h, w, 1))
        img = Image.fromarray(np.clip(np.broadcast_to(base, (h, w, 3)), 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 16))):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
            fill = tuple(int(c) for c in rng.integers(0, 256, 3))
            shape = rng.random()
            if shape < 0.4:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif shape < 0.8:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(3)], fill=fill)
            line = tuple(int(c) for c in rng.integers(0, 256, 3))
            draw.line((x0, y1, x1, y0), fill=line, width=int(rng.integers(1, 5)))
        if i % 7 == 3:
            img = img.convert("L").convert("RGB")
        out[i] = _to_uint8(resize_like_caffe(np.asarray(img)))
    out.setflags(write=False)  # cached: shared by every caller
    return out


def _to_uint8(rgb224: torch.Tensor) -> np.ndarray:
    return rgb224.round_().clamp_(0, 255).to(torch.uint8).numpy()


def images_from_files(
    paths: Iterable[str], count: int = CALIBRATION_COUNT
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Up to ``count`` of ``paths`` (spread evenly over them when there are more) decoded and resized as i2v
    does: (uint8 (N, 224, 224, 3), the paths used, [(path, error)] for those that could not be read)."""
    from .decode import image_to_array, open_image
    from .transform import resize_like_caffe

    paths = list(paths)
    if count < 1:
        raise CalibrationError(f"the calibration set needs at least one image, not {count}")
    if len(paths) > count:  # evenly spread: a folder sorted by name is often sorted by series or date
        paths = [paths[(i * len(paths)) // count] for i in range(count)]
    images, used, failed = [], [], []
    for path in paths:
        try:
            images.append(_to_uint8(resize_like_caffe(image_to_array(open_image(path)))))
            used.append(path)
        except (I2VError, ValueError, TypeError) as exc:  # one bad file is reported, never the end of the set
            failed.append((path, str(exc)))
    array = np.stack(images) if images else np.empty((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    return array, used, failed


def save_calibration(images: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a calibration set as an ``.npz`` holding ``images`` (uint8 (N, 224, 224, 3)), atomically."""
    _check_images(np.asarray(images), str(path))
    try:
        with atomic_write(path) as f:
            np.savez(f, images=np.ascontiguousarray(images, dtype=np.uint8))
    except OSError as exc:  # a full disk, a read-only folder: one line (exit 3), the old file left as it was
        raise WriteError(describe_oserror(path, exc)) from None


def load_calibration(path: str | os.PathLike[str]) -> np.ndarray:
    """A calibration set written by :func:`save_calibration`; CalibrationError, naming the file, when it is not one."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz.files:
                raise CalibrationError(f"{path}: not an i2v calibration file (no 'images' array)")
            images = npz["images"]
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the calibration file ({exc.strerror or exc})") from None
    except (ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{path}: not an i2v calibration file ({exc})") from None
    _check_images(images, str(path))
    return images


def _check_images(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise CalibrationError(
            f"{where}: a calibration set is uint8 (N, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, "
            f"not {images.dtype} {tuple(images.shape)}"
        )
    if len(images) == 0:
        raise CalibrationError(f"{where}: the calibration set holds no image")


def default_calibration_file() -> Path:
    """Where ``i2v weights calibrate`` writes by default, and where int8 looks for the user's own set."""
    from .weights import default_weights_dir

    return default_weights_dir() / "calibration.npz"


@dataclass(frozen=True)
class Calibration:
    """A calibration set, read only when a network has to be quantised: ``key`` names its content (the file's
    SHA-256, or the built-in set's version), ``source`` says where it comes from."""

    key: str
    source: str
    path: Path | None = None

    def images(self) -> np.ndarray:
        """The set's uint8 (N, 224, 224, 3) images."""
        return synthetic_images() if self.path is None else load_calibration(self.path)


def find_calibration(path: str | os.PathLike[str] | None = None) -> Calibration:
    """The calibration set int8 uses: ``path``, else ``$I2V_CALIBRATION``, else the default file
    (:func:`default_calibration_file`) when it exists, else the built-in synthetic set."""
    path = path or os.environ.get(CALIBRATION_ENV) or None
    if path is None and default_calibration_file().is_file():
        path = default_calibration_file()
    if path is None:
        return Calibration(f"synthetic-{_SYNTH_VERSION}-{CALIBRATION_COUNT}", "the built-in synthetic set")
    try:
        digest = sha256_file(path).hex()
    except OSError as exc:
        raise CalibrationError(f"{path}: cannot read the calibration file ({exc.strerror or exc})") from None
    return Calibration(digest, str(path), Path(path))


def network_inputs(images: np.ndarray) -> torch.Tensor:
    """A calibration set as the network's (N, 3, 224, 224) float32 inputs (BGR minus the mean, as
    :func:`i2v_cli.transform.to_network_input`)."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    return (torch.tensor(images, dtype=torch.float32).flip(3).permute(0, 3, 1, 2) - mean).contiguous()


# --------------------------------------------------------------------------------------------------------
# GPTQ


def _int8_convolutions(model: Illust2VecNet) -> list[nn.Conv2d]:
    """conv1_1 ... conv6_3: the convolutions that run in int8. The tag network's conv6_4 stays in fp32: its
    output is averaged and goes through the sigmoid, and quantising it to 8 bits moved 0.3% more decisions."""
    return [m for m in model.features if isinstance(m, nn.Conv2d)]


def _patches(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The 3x3 patches (zero padding) at flat positions ``idx`` of x: (B, C*9, P), as ``F.unfold(x, 3, padding=1)
    [:, :, idx]`` (channel-major, then kernel row, then column: the order of ``weight.flatten(1)``), without
    unfolding every position."""
    b, c, _, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1)).reshape(b, c, -1)
    r, col = idx // width, idx % width
    taps = [padded[:, :, (r + dy) * (width + 2) + (col + dx)] for dy in range(3) for dx in range(3)]
    return torch.stack(taps, dim=2).reshape(b, c * 9, len(idx))


@dataclass
class Statistics:
    """What quantising a network needs from the calibration set: per int8 convolution X Xᵀ of its input
    patches (GPTQ's weighting), the input's range and each ReLU's largest output per channel (the activation
    scales, and the equalisation)."""

    hessians: list[torch.Tensor]
    input_range: tuple[float, float]
    channel_max: list[torch.Tensor]

    @property
    def relu_max(self) -> list[float]:
        """Each ReLU's largest output over all its channels."""
        return [float(c.max()) for c in self.channel_max]


def calibration_statistics(model: Illust2VecNet, inputs: torch.Tensor, batch: int = 8) -> Statistics:
    """One fp32 pass over ``inputs`` (channels_last, oneDNN) gathering :class:`Statistics`. X Xᵀ is taken over
    a deterministic sample of each layer's input patches: at least 16384, or 4 per input element, in all."""
    convs = _int8_convolutions(model)
    hessians = [torch.zeros(c.weight[0].numel(), c.weight[0].numel()) for c in convs]
    seen = [0] * len(convs)
    channel_max: list[torch.Tensor] = []
    gen = torch.Generator().manual_seed(0)
    n = len(inputs)
    with torch.inference_mode():
        for start in range(0, n, batch):
            x = inputs[start : start + batch].float().contiguous(memory_format=torch.channels_last)
            i = r = 0
            for module in model.features:
                if isinstance(module, nn.Conv2d):
                    k, positions = x.shape[1] * 9, x.shape[2] * x.shape[3]
                    per_image = min(positions, math.ceil(max(_MIN_COLUMNS, _COLUMNS_PER_INPUT * k) / n))
                    idx = torch.randperm(positions, generator=gen)[:per_image].sort().values
                    cols = _patches(x, idx).transpose(0, 1).reshape(k, -1)
                    hessians[i].addmm_(cols, cols.T)
                    seen[i] += cols.shape[1]
                    x = module(x)
                    i += 1
                elif isinstance(module, nn.ReLU):
                    x = F.relu(x)
                    top = x.amax(dim=(0, 2, 3))
                    if r == len(channel_max):
                        channel_max.append(top)
                    channel_max[r] = torch.maximum(channel_max[r], top)
                    r += 1
                else:
                    x = module(x)
    hessians = [h / max(c, 1) for h, c in zip(hessians, seen, strict=True)]
    return Statistics(hessians, (float(inputs.min()), float(inputs.max())), channel_max)


def equalization(channel_max: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per ReLU, the factor each of its channels is multiplied by: sqrt(max / max_i), at most
    :data:`_MAX_EQUALIZATION` (1 for a channel that never fires). The square root, not max / max_i: dividing the
    next convolution's inputs makes its weights for the small channels coarser; measured on the benchmark's feature
    network, the full factor kept 99.03% of the bits, the square root 99.16% (simulated, bench/int8_probe.py)."""
    out = []
    for top in channel_max:
        s = (top.max() / top.clamp_min(1e-30)).sqrt().clamp_max(_MAX_EQUALIZATION)
        out.append(torch.where(top > 0, s, torch.ones_like(s)).float())
    return out


def equalize(
    statistics: Statistics, convs: list[nn.Conv2d]
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Rescale the activations channel by channel (cross-layer equalisation, Nagel et al. 2019), so that one uint8
    scale per tensor fits every channel: ReLU and max-pooling commute with a positive factor, so multiplying
    conv k's output channel i (weights and bias) by s_i and dividing conv k+1's input channel i by it computes the
    same network. ``statistics`` is updated in place to the rescaled network's (the Hessians are D H D, the
    maxima max_i * s_i). Returns the rescaled (weight, bias) of each convolution and 1 / s of the last ReLU, by
    which its output must be multiplied before the head."""
    scales = equalization(statistics.channel_max)
    out = []
    before = torch.ones(convs[0].in_channels)
    for i, (conv, s) in enumerate(zip(convs, scales, strict=True)):
        w = conv.weight.detach().float() * s.view(-1, 1, 1, 1) / before.view(1, -1, 1, 1)
        out.append((w, conv.bias.detach().float() * s))
        d = before.repeat_interleave(conv.weight[0, 0].numel())  # patch columns: channel-major, then the taps
        statistics.hessians[i].mul_(d.view(-1, 1)).mul_(d.view(1, -1))
        statistics.channel_max[i] = statistics.channel_max[i] * s
        before = s
    return out, before.reciprocal()


def gptq(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int = 8, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round a (out, ...) weight to ``bits``-bit integers with one symmetric scale per output channel, by
    GPTQ: returns (integers as int8, scales as float32 (out,)). ``hessian`` is X Xᵀ of the layer's inputs."""
    shape = weight.shape
    qmax = 2 ** (bits - 1) - 1
    # Transposed, (inputs, out): a column of the weight is a contiguous row here.
    w = weight.detach().reshape(shape[0], -1).to(torch.float32).T.contiguous()
    scale = w.abs().amax(dim=0).clamp_min(1e-12) / qmax
    inv_scale = scale.reciprocal()
    h = hessian.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0  # inputs that never fire: their weights do not matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    order = torch.argsort(torch.diagonal(h), descending=True)  # the largest inputs first ("act order")
    w, h = w[order], h[order][:, order]
    h.diagonal().add_(_DAMP * float(torch.diagonal(h).mean()))
    hinv = _inverse_upper_cholesky(h)
    del h
    q = torch.empty_like(w)
    rows = w.shape[0]
    for i1 in range(0, rows, block):
        i2 = min(i1 + block, rows)
        w1, hi = w[i1:i2], hinv[i1:i2, i1:i2]
        err = torch.empty_like(w1)
        for j in range(i2 - i1):
            qj = torch.clamp(torch.round(w1[j] * inv_scale), -qmax, qmax)
            q[i1 + j] = qj
            err[j] = (w1[j] - qj * scale) / hi[j, j]
            w1[j:].addr_(hi[j, j:], err[j], alpha=-1.0)
        w[i2:].addmm_(hinv[i1:i2, i2:].T, err, alpha=-1.0)
    q = q[torch.argsort(order)].T
    return q.to(torch.int8).reshape(shape).contiguous(), scale


def _inverse_upper_cholesky(h: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), from one Cholesky and one triangular inverse: with J the
    reversal, U = J L⁻¹ J where L is the Cholesky factor of J H J."""
    lower = torch.linalg.cholesky(h.flip(0, 1))
    return torch.linalg.solve_triangular(lower, torch.eye(h.shape[0], dtype=h.dtype), upper=False).flip(0, 1)


# --------------------------------------------------------------------------------------------------------
# The QDQ model


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a tensor of network inputs."""

    def __init__(self, inputs: torch.Tensor, name: str, batch: int = 8) -> None:
        self.batches = iter([{name: inputs[i : i + batch].numpy()} for i in range(0, len(inputs), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def rewind(self) -> None:  # part of the protocol; calibration reads the set once
        raise NotImplementedError


class _QuantizerAdvice(logging.Filter):
    """ONNX Runtime's quantiser advises pre-processing through the root logger (`WARNING:root:` on the user's
    terminal): i2v does its own, so the advice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _no_quantizer_advice() -> Iterator[None]:
    """While quantising: :class:`_QuantizerAdvice` on the root logger (and the library never prints)."""
    advice = _QuantizerAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_onnx(model: nn.Module, float_onnx: bytes, images: np.ndarray) -> bytes:
    """The QDQ int8 version of ``float_onnx`` (the export of ``model``, or of its conv trunk): conv1_1 ... conv6_3
    equalised (:func:`equalize`) with GPTQ-rounded int8 weights (one scale per output channel) and uint8
    activations (one scale per tensor, the calibration set's range); the last ReLU's output is multiplied back
    (in fp32) before the head."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    net = model if isinstance(model, Illust2VecNet) else model.network  # the whole network, of a FeatureTrunk
    inputs = network_inputs(images)
    stats = calibration_statistics(net, inputs)
    proto = onnx.load_from_string(float_onnx)
    inits = {t.name: t for t in proto.graph.initializer}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    relus = [n for n in proto.graph.node if n.op_type == "Relu"]
    if len(convs) < len(stats.hessians) or len(relus) != len(stats.channel_max):
        raise RuntimeError(f"the ONNX export has {len(convs)} Conv and {len(relus)} Relu nodes: not this network")
    rescaled, unscale = equalize(stats, _int8_convolutions(net))
    _multiply_output(proto, relus[-1], unscale.view(1, -1, 1, 1).numpy())  # the head sees the network's own values
    input_name = proto.graph.input[0].name
    lo, hi = stats.input_range
    overrides: dict[str, list[dict]] = {input_name: [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(hi)}]}
    for node, top in zip(relus, stats.relu_max, strict=True):
        overrides[node.output[0]] = [{"rmin": np.float32(0.0), "rmax": np.float32(max(top, 1e-6))}]
    for i, (node, (weight, bias)) in enumerate(zip(convs, rescaled, strict=False)):
        hessian, stats.hessians[i] = stats.hessians[i], torch.empty(0)  # let each go once used (up to 340 MB)
        q, scale = gptq(weight, hessian)
        del hessian
        name = node.input[1]
        # The integers times the scales: ONNX Runtime's rounding with our scales gives back our integers.
        dequantized = (q.float() * scale.view(-1, 1, 1, 1)).numpy()
        inits[name].CopyFrom(numpy_helper.from_array(dequantized, name))
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.numpy(), node.input[2]))
        overrides[name] = [{"axis": 0, "scale": np.float32(s), "zero_point": np.int8(0)} for s in scale.tolist()]
    with tempfile.TemporaryDirectory(prefix="i2v-int8-") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save_model(proto, src)
        del proto
        with _no_quantizer_advice():
            quantize_static(
                src,
                dst,
                _Reader(inputs[:1], input_name),  # every range is given: the pass only satisfies the API
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "MaxPool", "Relu"],
                nodes_to_exclude=[n.name for n in convs[len(stats.hessians) :]],  # the tag network's conv6_4
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"TensorQuantOverrides": overrides, "QDQDisableWeightAdjustForInt32Bias": True},
            )
        return dst.read_bytes()


def _multiply_output(proto, node, factor: np.ndarray) -> None:
    """Insert, right after ``node``, a Mul of its output by the constant ``factor``, read by all its consumers."""
    from onnx import helper, numpy_helper

    name = node.output[0]
    scaled, const = f"{name}_i2v_unequalized", f"{name}_i2v_unequalize"
    for other in proto.graph.node:
        for k, x in enumerate(other.input):
            if x == name:
                other.input[k] = scaled
    for out in proto.graph.output:
        if out.name == name:
            raise RuntimeError(f"{name} is an output of the graph: not this network")
    proto.graph.initializer.append(numpy_helper.from_array(factor.astype(np.float32), const))
    nodes = list(proto.graph.node)
    nodes.insert(
        nodes.index(node) + 1, helper.make_node("Mul", [name, const], [scaled], name=f"{node.name}_i2v_unequalize")
    )
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def int8_cache_key(model: nn.Module, calibration: Calibration, digest: str | None = None) -> str:
    """Key of a cached int8 model: the weights (``digest``, their :func:`~i2v_cli.inference.weights_digest` when
    known), the calibration set, the recipe and the library versions."""
    import onnx
    import onnxruntime

    from .inference import weights_digest

    parts = [
        digest or weights_digest(model),
        calibration.key,
        RECIPE,
        torch.__version__,
        onnxruntime.__version__,
        onnx.__version__,
    ]
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:32]


#: Names of int8 files before the weights' digest was part of them (``NAME-KEY.onnx``): no run opens them again.
_LEGACY_INT8 = re.compile(r"(tag-int8|feature-int8|feature-int8-trunk)-[0-9a-f]{32}\.onnx")


def cached_int8(
    model: nn.Module, name: str, calibration: Calibration, cache_dir: Path | None = None, *, remake: bool = False
) -> str | bytes:
    """``model``'s int8 ONNX file in the cache (``int8/NAME-WEIGHTS-KEY.onnx``, made once), or its bytes when the
    cache cannot be written or its name is not UTF-8 (the runtimes take file names as UTF-8 text only). Making one
    removes the files no run will open again: the same weights' with another calibration set, recipe or library
    version, and those named before the weights were in the name (tens of MB each). ``remake``: quantise again
    whatever the cache holds (a damaged file: replaced where the cache can be written, else run from memory)."""
    from .inference import _is_utf8, export_onnx, weights_digest
    from .weights import default_weights_dir

    folder = (cache_dir or default_weights_dir()) / "int8"
    digest = weights_digest(model)
    same_weights = f"{name}-{digest[:16]}-"
    path = folder / f"{same_weights}{int8_cache_key(model, calibration, digest)}.onnx"
    if path.is_file() and not remake:
        return str(path) if _is_utf8(str(path)) else path.read_bytes()
    buffer = io.BytesIO()
    export_onnx(model, buffer)
    data = quantize_onnx(model, buffer.getvalue(), calibration.images())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
    except (OSError, I2VError):  # a read-only or full cache: run from memory, quantise again next time
        return data
    for old in folder.glob("*.onnx"):
        if old != path and (old.name.startswith(same_weights) or _LEGACY_INT8.fullmatch(old.name)):
            with contextlib.suppress(OSError):
                old.unlink()
    return str(path) if _is_utf8(str(path)) else data


# --------------------------------------------------------------------------------------------------------
# Running it


#: What runs the int8 file: ONNX Runtime, or OpenVINO (the ``openvino`` extra) when ``$I2V_INT8_RUNTIME=openvino``.
#: OpenVINO was 10% faster on the measured CPU, but with it loaded, a process that also forks workers and runs
#: Ray (the test suite) died of a segmentation fault: opt-in until that is understood.
RUNTIMES = ("onnxruntime", "openvino")


def openvino_available() -> bool:
    """Whether OpenVINO is importable (the optional ``openvino`` extra)."""
    return importlib.util.find_spec("openvino") is not None


def default_runtime() -> str:
    """``$I2V_INT8_RUNTIME`` when set, else ONNX Runtime."""
    chosen = os.environ.get("I2V_INT8_RUNTIME")
    if chosen:
        if chosen not in RUNTIMES:
            raise I2VError(f"I2V_INT8_RUNTIME={chosen!r}: use {' or '.join(RUNTIMES)}")
        if chosen == "openvino" and not openvino_available():
            raise I2VError("I2V_INT8_RUNTIME=openvino, but OpenVINO is not installed: pip install openvino")
        return chosen
    return "onnxruntime"


class Int8Net:
    """The int8 network on the CPU: a callable from a (N, 3, 224, 224) tensor to its output (tag probabilities,
    or ``encode1``, computed in fp32 in torch by :class:`~i2v_cli.inference.PackedEncode1` on the int8 trunk's
    output). The QDQ file runs in ONNX Runtime or
    OpenVINO (``runtime``; default :func:`default_runtime`), with as many threads as PyTorch uses."""

    def __init__(
        self,
        model: Illust2VecNet,
        calibration: Calibration | None = None,
        cache_dir: Path | None = None,
        threads: int | None = None,
        runtime: str | None = None,
    ) -> None:
        self.calibration = calibration or find_calibration()
        self.runtime = runtime or default_runtime()
        from .inference import FeatureTrunk, pack_encode1
        from .ortcache import ort_errors  # what the runtimes raise for a file they cannot load (OpenVINO: RuntimeError)

        exported: nn.Module = model
        name = "tag-int8"
        self.head: nn.Module | None = None
        if model.arch.kind != TAG:  # the int8 trunk, then encode1 in fp32 in torch, packed in place of the model's
            pack_encode1(model)
            exported, name, self.head = FeatureTrunk(model), "feature-int8-trunk", model.encode1
        threads = threads or torch.get_num_threads()
        #: What did not go as asked (see inference.Predictor): a damaged cache entry quantised again, say.
        self.notes: list[str] = []
        onnx_model = cached_int8(exported, name, self.calibration, cache_dir)
        try:
            self._run = self._open(onnx_model, threads)
        except ort_errors() as exc:
            # A damaged cache entry (a cut copy, say): quantised again, as a damaged fp32 export is exported again;
            # replaced in the cache, or run from memory where the cache is read-only (or named in other than UTF-8).
            where = f" {onnx_model}" if isinstance(onnx_model, str) else ""
            note = f"the cached int8 network{where} could not be loaded ({first_line(exc)}): quantised it again"
            self.notes.append(note)
            warnings.warn(note, BackendWarning, stacklevel=2)
            onnx_model = cached_int8(exported, name, self.calibration, cache_dir, remake=True)
            try:
                self._run = self._open(onnx_model, threads)
            except ort_errors() as again:
                raise I2VError(
                    f"the {self.runtime} runtime cannot load the int8 network ({first_line(again)})"
                ) from None
        #: What computes the outputs, in words.
        self.name = f"int8 ({self.runtime}) on cpu"

    def _open(self, onnx_model: str | bytes, threads: int) -> Callable[[np.ndarray], np.ndarray]:
        """The runtime's session on the int8 file (a path) or its bytes, as a function of a float32 batch."""
        if self.runtime == "openvino":
            import openvino as ov

            core = ov.Core()
            # A file is read by path; bytes (no writable cache) through ONNX's in-memory reader.
            source = onnx_model if isinstance(onnx_model, str) else core.read_model(onnx_model, b"")
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
            compiled = core.compile_model(source, "CPU", config)
            self._request = compiled.create_infer_request()
            names = [next(iter(i.names)) for i in compiled.inputs]
            # share_inputs: OpenVINO reads the input in place (by default it copies it)
            return lambda x: self._request.infer({names[0]: x}, share_inputs=True)[0]
        import onnxruntime as ort

        from .ortcache import session_options

        options = session_options(threads)
        session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        input_name = session.get_inputs()[0].name
        return lambda x: session.run(None, {input_name: x})[0]

    def describe(self) -> str:
        """The name and the notes, in one line."""
        return "; ".join([self.name, *self.notes])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run a float32 CPU batch through the int8 network."""
        out = torch.from_numpy(np.asarray(self._run(x.detach().to(torch.float32).contiguous().numpy())))
        if self.head is None:
            return out
        from .inference import fp32_mode

        with fp32_mode("ieee"), torch.inference_mode():
            return self.head(out)


def prepare_int8(
    model: Illust2VecNet, cache_dir: Path | None = None, calibration: str | os.PathLike[str] | None = None
) -> Int8Net:
    """``model`` quantised to int8 with the calibration set :func:`find_calibration` picks (made once per
    weights and calibration set, then read from the cache)."""
    return Int8Net(model, find_calibration(calibration), cache_dir)


def agreement(a: np.ndarray, b: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of the entries on the same side of ``threshold`` in two score arrays."""
    return float(np.mean((np.asarray(a) > threshold) == (np.asarray(b) > threshold)))
