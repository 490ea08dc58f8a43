"""Making a loaded network fast on its device, without changing its results unless a precision flag says so.

Measured on a 2-core AVX-512 CPU (full-size tag network, batch 8): eager NCHW 3.7 img/s, channels_last 6.0,
oneDNN convolutions with weights reordered once and ReLU fused (:class:`PackedCPUNet`) about 13-14, ONNX
Runtime about 15. So on a CPU in fp32 the ``auto`` backend is ONNX Runtime when it is installed (the ``onnx``
extra), else the packed oneDNN network; other precisions and CUDA run in PyTorch (channels_last, autocast).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TAG
from .errors import I2VError
from .model import Illust2VecNet

#: Numeric precisions of ``--precision``: fp32 gives the reference results; bf16/fp16 run under autocast;
#: int8 (CPU) is the network quantised from a calibration set (:mod:`i2v_cli.quantize`).
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
#: Inference backends of ``--backend``.
BACKENDS = ("auto", "torch", "onnxruntime")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ONNX opset used for the export; part of the cache key.
_OPSET = 17

Predictor = Callable[[torch.Tensor], torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    """The device a network's parameters live on."""
    return next(model.parameters()).device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision the device cannot run (fp16 needs CUDA, int8 the CPU and ONNX Runtime)
    or an unknown one."""
    if precision not in PRECISIONS:
        raise I2VError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise I2VError("--precision fp16 needs a CUDA device; on a CPU use bf16 (or fp32, the default)")
    if precision == "int8" and device.type != "cpu":
        raise I2VError("--precision int8 runs on the CPU: use --device cpu, or bf16/fp16 on CUDA")
    if precision == "int8" and not onnxruntime_available():
        raise I2VError("--precision int8 needs ONNX Runtime: pip install 'i2v[onnx]'")


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's needs are importable (the ``onnx`` extra)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, precision: str) -> str:
    """``auto`` is ONNX Runtime for fp32 on a CPU when it is installed (faster there, same results), else torch."""
    if backend not in BACKENDS:
        raise I2VError(f"unknown backend {backend!r}: use {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cpu" and precision in ("fp32", "int8") and onnxruntime_available():
            return "onnxruntime"
        return "torch"
    if precision == "int8" and backend == "torch":
        raise I2VError("--precision int8 runs in ONNX Runtime: use --backend auto (or onnxruntime)")
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise I2VError("--backend onnxruntime runs on the CPU: use --device cpu, or --backend torch on CUDA")
        if precision not in ("fp32", "int8"):
            raise I2VError(f"--backend onnxruntime computes in fp32: use --backend torch for --precision {precision}")
        if not onnxruntime_available():
            raise I2VError("--backend onnxruntime needs ONNX Runtime: pip install 'i2v[onnx]'")
    return backend


class PackedCPUNet(nn.Module):
    """The network on oneDNN with each convolution's weights reordered once and its ReLU fused in.

    Eager PyTorch reorders the weights on every call; doing it once is what makes TorchScript's
    ``optimize_for_inference`` and inductor's freezing fast, without their tracing or compile time.
    Same arithmetic as eager fp32 (differences around 1e-6).
    """

    def __init__(self, model: Illust2VecNet) -> None:
        super().__init__()
        self.kind = model.arch.kind
        self.steps: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        for module in model.features:
            if isinstance(module, nn.Conv2d):
                self.steps.append(("conv", *_pack_conv(module)))
            elif isinstance(module, nn.MaxPool2d):
                self.steps.append(("pool", None, None))
        if self.kind == TAG:
            self.head = _pack_conv(model.conv6_4)
        else:  # the Linear layer stays as it is, sharing the model's weight (no copy of a 800 MB matrix)
            self.encode1 = model.encode1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tag probabilities or ``encode1``, as :meth:`Illust2VecNet.forward`."""
        x = x.contiguous(memory_format=torch.channels_last)
        for op, weight, bias in self.steps:
            x = _conv(x, weight, bias, "relu") if op == "conv" else F.max_pool2d(x, 2, 2)
        if self.kind == TAG:
            return torch.sigmoid(_conv(x, *self.head, "none").mean(dim=(2, 3)))
        return self.encode1(torch.flatten(x.contiguous(), 1))


def _pack_conv(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = conv.weight.detach()
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, [8, weight.shape[1], 56, 56]
    )
    return packed, None if conv.bias is None else conv.bias.detach()


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, attr, [], "")


class TorchNet(nn.Module):
    """The network in channels_last (fast convolutions on CUDA and oneDNN), its trunk under autocast when a
    lower precision is asked for. The head (conv6_4 or encode1) stays in fp32: it costs under a tenth of the
    work and keeps more scores on the right side of a threshold (measured on the golden models)."""

    def __init__(self, model: Illust2VecNet, precision: str = "fp32") -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.dtype = _DTYPES.get(precision)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output in float32, computed in the asked precision."""
        x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(x.device.type, dtype=self.dtype):
            h = self.model.forward_features(x)
        out = self.model.forward_head(h.float())
        return torch.sigmoid(out) if self.model.arch.kind == TAG else out


def pack_for_cpu(model: Illust2VecNet) -> nn.Module:
    """:class:`PackedCPUNet` when this torch build has the oneDNN operators it needs and they agree with
    eager on a small input; otherwise the model in channels_last."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return TorchNet(model)
    try:
        packed = PackedCPUNet(model)
        probe = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 50
        with torch.inference_mode():
            got, want = _trunk(packed, probe), model.features(probe)
        if not torch.allclose(got, want, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=1e-4):
            return TorchNet(model)
    except (RuntimeError, AttributeError, NotImplementedError):
        return TorchNet(model)
    return packed


def _trunk(packed: PackedCPUNet, x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous(memory_format=torch.channels_last)
    for op, weight, bias in packed.steps:
        x = _conv(x, weight, bias, "relu") if op == "conv" else F.max_pool2d(x, 2, 2)
    return x


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the network's parameters (names, shapes, bytes): the ONNX cache key, whatever file they came from."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def export_onnx(model: nn.Module, target: str | os.PathLike[str] | io.BytesIO) -> None:
    """Export a network (or its trunk) to ONNX (dynamic batch, 224x224 input) with torch's exporter."""
    model = model.eval()
    device = model_device(model)
    extra = getattr(model, "extra_inputs", {})  # name -> example: inputs fed beside the image (not in the file)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
        kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224, device=device), *extra.values()),
            target,
            input_names=["input", *extra],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=_OPSET,
            **kwargs,
        )


def cached_onnx(model: nn.Module, name: str, cache_dir: Path | None = None) -> str | bytes:
    """``model``'s ONNX file in the cache (exported once per weights, torch version and opset), or the model
    bytes when the cache cannot be written; ``name`` starts the file's name."""
    from .weights import default_weights_dir

    folder = (cache_dir or default_weights_dir()) / "onnx"
    key = hashlib.sha256(f"{weights_digest(model)}:{torch.__version__}:{_OPSET}".encode()).hexdigest()[:32]
    path = folder / f"{name}-{key}.onnx"
    if path.is_file():
        return str(path)
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        export_onnx(model, tmp)
        os.replace(tmp, path)
        return str(path)
    except OSError:
        buffer = io.BytesIO()
        export_onnx(model, buffer)
        return buffer.getvalue()
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


class _FeatureNet(nn.Module):
    """The feature network with ``encode1``'s weight as a second input: exported so, the ONNX file holds
    everything but that 800 MB matrix, which the session reads from the model's own tensor at each call."""

    def __init__(self, model: Illust2VecNet) -> None:
        super().__init__()
        self.features = model.features
        self.bias = model.encode1.bias
        self.extra_inputs = {"encode1_weight": model.encode1.weight.detach()}

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.flatten(self.features(x), 1), weight, self.bias)


class OnnxRuntimeNet:
    """The network as an ONNX Runtime CPU session: a callable from a (N, 3, 224, 224) tensor to its output.

    Both networks run whole in the session. The feature network's ``encode1`` weight is not in it: it is fed
    at each call from the model's own tensor, without a copy (ONNX Runtime reads the numpy view in place), so
    the 800 MB matrix is held once, and ONNX Runtime's product is faster than torch's on it (1.3-1.9x at
    batch 8, measured), which brings the feature network to a plain session's speed.
    """

    def __init__(self, model: Illust2VecNet, cache_dir: Path | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.feeds: dict[str, np.ndarray] = {}
        exported: nn.Module = model
        name = model.arch.kind
        if model.arch.kind != TAG:
            exported, name = _FeatureNet(model), f"{model.arch.kind}-whole"
            self.feeds = {"encode1_weight": model.encode1.weight.detach().contiguous().numpy()}  # shares memory

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # as many as PyTorch would use
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        onnx_model = cached_onnx(exported, name, cache_dir)
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run a float32 CPU batch through the session."""
        feeds = {self.input_name: x.detach().to(torch.float32).contiguous().numpy(), **self.feeds}
        (y,) = self.session.run(None, feeds)
        return torch.from_numpy(y)


def predict(
    net: Predictor, inputs: torch.Tensor | Sequence[torch.Tensor], device: torch.device, batch_size: int | None = None
) -> np.ndarray:
    """``net`` over network inputs (a (N, 3, 224, 224) tensor, or a list of (3, 224, 224) ones, stacked a batch at
    a time), ``batch_size`` at a time (all at once when None), on ``device``; float32 (N, out)."""
    step = batch_size or max(len(inputs), 1)
    outs = []
    with torch.inference_mode():
        for start in range(0, len(inputs), step):
            chunk = inputs[start : start + step]
            x = chunk if isinstance(chunk, torch.Tensor) else torch.stack(list(chunk))
            outs.append(net(x.to(device, non_blocking=True)).float().cpu().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)


def prepare_for_inference(
    model: Illust2VecNet, *, precision: str = "fp32", backend: str = "auto", cache_dir: Path | None = None
) -> Predictor:
    """The fastest measured way to compute ``model(x)`` on the model's device in ``precision``.

    fp32 keeps results within 1e-5 of eager; bf16/fp16 trade about 1e-2 in scores for speed (autocast).
    """
    device = model_device(model)
    check_precision(precision, device)
    model = model.eval()
    if resolve_backend(backend, device, precision) == "onnxruntime":
        if precision == "int8":
            from .quantize import prepare_int8

            return prepare_int8(model, cache_dir)
        return OnnxRuntimeNet(model, cache_dir)
    if device.type == "cpu" and precision == "fp32":
        return pack_for_cpu(model)
    return TorchNet(model, precision)
