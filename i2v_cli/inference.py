"""Making a loaded network fast on its device, without changing its results unless a precision flag says so.

Measured on a 2-core AVX-512 CPU (full-size tag network, batch 8): eager NCHW 3.7 img/s, channels_last 6.0,
oneDNN convolutions with weights reordered once and ReLU fused (:class:`PackedCPUNet`) about 13-14, ONNX
Runtime about 15. So on a CPU in fp32 the ``auto`` backend is ONNX Runtime when it is installed (the ``onnx``
extra), else the packed oneDNN network; other precisions and CUDA run in PyTorch (channels_last, autocast).

Every predictor says what runs it: ``name`` (``"torch packed oneDNN fp32 on cpu"``), ``notes`` (what did not go
as asked, e.g. a fallback) and ``describe()`` (both in one line). Whenever a backend is not used as asked (an
ONNX cache entry rebuilt, ONNX Runtime or the packed path replaced by plain PyTorch) a
:class:`~i2v_cli.errors.BackendWarning` is issued with the same text; the library never prints.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic import write_bytes
from .config import BACKENDS, INPUT_SIZE, PRECISIONS, TAG
from .errors import BackendWarning, I2VError, OutputError, first_line
from .model import Illust2VecNet
from .ortcache import OPTIMISED_FOLDER, new_session, open_optimised, ort_errors, session_saving_optimised
from .store import onnx_cache_dir

#: Numeric precisions of ``--precision``. fp32 gives the reference results (IEEE float32 arithmetic, TF32 off);
#: tf32 lets CUDA convolutions use TensorFloat-32 (Ampere and newer GPUs); bf16/fp16 run them under autocast.
#: The three move scores by about 1e-2 and run about 4-5 times faster than fp32 on a recent GPU.
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: ONNX opset used for the export; part of the cache key.
_OPSET = 17
#: Batch size the packed weights' memory layout is chosen for (the CLI's default); any batch size runs.
_PACK_BATCH_HINT = 16


class Predictor(Protocol):
    """What :func:`prepare_for_inference` returns: ``net(x)`` maps a float32 batch (N, 3, INPUT_SIZE,
    INPUT_SIZE) on the model's device to its (N, out) output, and says what computes it."""

    #: What computes the outputs, in words: ``"onnxruntime fp32 on cpu (cached export)"``.
    name: str
    #: What did not go as asked (a rebuilt cache entry, a fallback), one line each; empty when all went well.
    notes: list[str]

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> str: ...


class _Described:
    """``name``, ``notes`` and ``describe()`` for the predictors of this module."""

    name: str = ""
    notes: list[str]

    def describe(self) -> str:
        """``name``, then each note: one line for ``--verbose`` or a summary."""
        return "; ".join([self.name, *self.notes])


def model_device(model: nn.Module) -> torch.device:
    """The device a network's parameters live on."""
    return next(model.parameters()).device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, in one line, a precision the device cannot run (fp16 and tf32 need CUDA, int8 the CPU and ONNX
    Runtime) or an unknown one."""
    if precision not in PRECISIONS:
        raise I2VError(f"unknown precision {precision!r}: use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise I2VError("--precision fp16 needs a CUDA device; on a CPU use bf16 (or fp32, the default)")
    if precision == "int8" and device.type != "cpu":
        raise I2VError("--precision int8 runs on the CPU: use --device cpu, or bf16/fp16 on CUDA")
    if precision == "int8" and not onnxruntime_available():
        raise I2VError("--precision int8 needs ONNX Runtime: pip install onnx onnxruntime")
    if precision == "tf32" and device.type != "cuda":
        raise I2VError(
            "--precision tf32 is TensorFloat-32 on CUDA (Ampere and newer GPUs); on a CPU use fp32 (or bf16)"
        )


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the ONNX exporter's needs are installed (the ``onnx`` extra). ``onnx`` is only
    looked for, not imported (about 0.1 s): a run with a cached export never needs it, and an export that fails
    for want of it falls back to PyTorch with a note."""
    import importlib.util

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("onnx") is not None


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
            raise I2VError("--backend onnxruntime needs ONNX Runtime: pip install onnx onnxruntime")
    return backend


# --------------------------------------------------------------------------------------------------------------
# float32 arithmetic: the reference is IEEE fp32, whatever the process-wide TF32 / oneDNN settings are

_CUDA_SWITCHES = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))
_CPU_SWITCHES = (("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))


def _switches(names: Sequence[tuple[str, str]]) -> list[Any]:
    """The ``torch.backends.X.Y`` objects that have an ``fp32_precision`` setting in this torch (2.9 and later)."""
    found = []
    for backend, op in names:
        obj = getattr(getattr(torch.backends, backend, None), op, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


@contextlib.contextmanager
def fp32_mode(mode: str = "ieee") -> Iterator[None]:
    """Inside the block, float32 convolutions and matrix products run in ``mode``: ``"ieee"`` (the reference:
    no TF32 on CUDA, no reduced-precision oneDNN on the CPU) or ``"tf32"`` (TensorFloat-32 on CUDA).

    torch 2.13 lets cuDNN convolutions use TF32 by default, so plain fp32 on a recent GPU is not the reference.
    These are process-wide settings: they are set on entry and the previous ones restored on exit (exceptions
    included), so a caller's own choice outside i2v's network calls is left alone.
    """
    if mode not in ("ieee", "tf32"):
        raise ValueError(f"mode must be 'ieee' or 'tf32', not {mode!r}")
    switches = _switches(_CUDA_SWITCHES + (_CPU_SWITCHES if mode == "ieee" else ()))
    if switches:
        saved = [s.fp32_precision for s in switches]
        try:
            for s in switches:
                s.fp32_precision = mode
            yield
        finally:
            for s, value in zip(switches, saved, strict=True):
                s.fp32_precision = value
        return
    # torch before 2.9: the legacy flags (cuBLAS and cuDNN), which default to TF32 on for cuDNN.
    saved_flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_flags


# --------------------------------------------------------------------------------------------------------------
# PyTorch


class TorchNet(_Described, nn.Module):
    """The network in channels_last (fast convolutions on CUDA and oneDNN). fp32 runs in IEEE arithmetic (see
    :func:`fp32_mode`), tf32 in TensorFloat-32. bf16 and fp16 run the trunk under autocast and the head (conv6_4
    or encode1) in IEEE fp32: it costs under a tenth of the work and keeps more scores on the right side of a
    threshold (measured on the golden models)."""

    def __init__(self, model: Illust2VecNet, precision: str = "fp32") -> None:
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last)
        self.precision = precision
        self.dtype = _DTYPES.get(precision)
        device = model_device(model)
        self.name = f"torch channels_last {precision} on {device}"
        self.notes = []
        if precision == "tf32" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
            self.notes.append(f"{torch.cuda.get_device_name(device)} has no TF32: tf32 runs as fp32 there")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output in float32, computed in the asked precision."""
        x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:  # fp32 (IEEE), or tf32 all through: on an H200 an IEEE head halved tf32's error
            with fp32_mode("tf32" if self.precision == "tf32" else "ieee"):  # (1e-2 to 5e-3) but cost a third
                return self.model(x)  # of its speed, and 1e-2 is what every lower precision promises
        with torch.autocast(x.device.type, dtype=self.dtype):
            h = self.model.forward_features(x)
        with fp32_mode("ieee"):
            out = self.model.forward_head(h.float())
        return torch.sigmoid(out) if self.model.arch.kind == TAG else out


class PackedCPUNet(_Described, nn.Module):
    """The network on oneDNN with each convolution's weights reordered once and its ReLU fused in.

    Eager PyTorch reorders the weights on every call; doing it once is what makes TorchScript's
    ``optimize_for_inference`` and inductor's freezing fast, without their tracing or compile time. Same
    arithmetic as eager fp32 (differences around 1e-6). The operators are private to PyTorch, so they are
    trusted only where they were seen to agree with eager: the first batch of each input shape is checked
    (its first and last image against the eager network); a disagreement, or an operator that fails, switches
    this predictor to :class:`TorchNet` for good, with a note and a :class:`~i2v_cli.errors.BackendWarning`.
    """

    def __init__(self, model: Illust2VecNet) -> None:
        super().__init__()
        self.kind = model.arch.kind
        self.reference = model  # eager: what the packed path must agree with
        self.steps: list[tuple[str, torch.Tensor | None, torch.Tensor | None]] = []
        size = INPUT_SIZE  # each layer's input side, for the layout the weights are packed in
        for module in model.features:
            if isinstance(module, nn.Conv2d):
                self.steps.append(("conv", *_pack_conv(module, size)))
            elif isinstance(module, nn.MaxPool2d):
                self.steps.append(("pool", None, None))
                size //= 2
        if self.kind == TAG:
            self.head = _pack_conv(model.conv6_4, size)
        else:  # encode1 packed in place of the model's Linear layer (no copy of a 800 MB matrix is kept)
            pack_encode1(model)
            self.encode1 = model.encode1
        self.checked: set[tuple[int, ...]] = set()
        self.fallback: TorchNet | None = None
        self.name = "torch packed oneDNN fp32 on cpu"
        self.notes = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tag probabilities or ``encode1``, as :meth:`Illust2VecNet.forward`."""
        if self.fallback is not None:
            return self.fallback(x)
        shape = tuple(x.shape)
        try:
            with fp32_mode("ieee"):
                out = self.packed_forward(x)
                if shape in self.checked:
                    return out
                problem = self._disagreement(x, out)
        except (RuntimeError, NotImplementedError) as exc:  # what a private operator raises for a shape it rejects
            problem = f"its operators failed ({first_line(exc)})"
        if problem is None:
            self.checked.add(shape)
            return out
        with torch.inference_mode(False):  # the model's parameters stay normal tensors, usable outside it too
            self.fallback = TorchNet(self.reference)
        note = (
            f"packed oneDNN path not used: on a {'x'.join(map(str, shape))} batch {problem}; using {self.fallback.name}"
        )
        self.name = self.fallback.name
        self.notes.append(note)
        warnings.warn(note, BackendWarning, stacklevel=2)
        return self.fallback(x)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The packed computation alone, unchecked."""
        x = x.contiguous(memory_format=torch.channels_last)
        for op, weight, bias in self.steps:
            x = _conv(x, weight, bias, "relu") if op == "conv" else F.max_pool2d(x, 2, 2)
        if self.kind == TAG:
            return torch.sigmoid(_conv(x, *self.head, "none").mean(dim=(2, 3)))
        flat = torch.flatten(x.contiguous(), 1)
        return self.encode1(flat)

    def _disagreement(self, x: torch.Tensor, out: torch.Tensor) -> str | None:
        """None when ``out`` agrees with eager on the batch's first and last image, else what differs."""
        rows = sorted({0, len(x) - 1})
        with torch.no_grad():
            want = self.reference(x[rows].contiguous())
        got = out[rows]
        tolerance = 1e-4 * max(1.0, float(want.abs().max()))
        if got.shape == want.shape and torch.allclose(got, want, atol=tolerance, rtol=1e-4):
            return None
        if got.shape != want.shape:
            return f"it gave shape {tuple(got.shape)}, eager {tuple(want.shape)}"
        return f"it differs from eager PyTorch by {float((got - want).abs().max()):.3g}"


def _pack_conv(conv: nn.Conv2d, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A convolution's weight in oneDNN's blocked layout for a ``size`` x ``size`` input, and its bias."""
    weight = conv.weight.detach()
    packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.to_mkldnn(), [1, 1], [1, 1], [1, 1], 1, [_PACK_BATCH_HINT, weight.shape[1], size, size]
    )
    return packed, None if conv.bias is None else conv.bias.detach()


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, attr: str) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, [1, 1], [1, 1], [1, 1], 1, attr, [], "")


def pack_for_cpu(model: Illust2VecNet) -> PackedCPUNet | TorchNet:
    """:class:`PackedCPUNet` when this torch build has the oneDNN operators it needs (each input shape is then
    checked against eager on first use); otherwise the model in channels_last, with a note saying why."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        net = TorchNet(model)
        net.notes.append("packed oneDNN path not available in this torch build")
        return net
    try:
        return PackedCPUNet(model)
    except (RuntimeError, AttributeError, NotImplementedError) as exc:  # the weight reorder refused
        net = TorchNet(model)
        net.notes.append(f"packed oneDNN path not available ({first_line(exc)})")
        return net


# --------------------------------------------------------------------------------------------------------------
# ONNX Runtime


def _is_utf8(name: str) -> bool:
    """Whether a file name is valid UTF-8 (Linux allows other bytes; they arrive as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class OnnxUnusableError(Exception):
    """ONNX Runtime cannot run this network here (the export failed, or the runtime refused the model); internal:
    :func:`prepare_for_inference` falls back to PyTorch."""


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the network's parameters (names, shapes, bytes): the ONNX cache key, whatever file they came from."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def export_onnx(model: nn.Module, target: str | Path | io.BytesIO) -> None:
    """Export a network to ONNX (dynamic batch, INPUT_SIZE x INPUT_SIZE input) with torch's exporter."""
    model = model.eval()
    device = model_device(model)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes are not the user's concern
        kwargs = {"dynamo": False} if "dynamo" in torch.onnx.export.__code__.co_varnames else {}
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, device=device),),
            target,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=_OPSET,
            **kwargs,
        )


def onnx_cache_path(model: nn.Module, name: str, cache_dir: Path | None = None) -> Path:
    """Where ``model``'s export is cached: one file per weights, torch version and opset; ``name`` starts it."""
    return onnx_cache_dir(cache_dir) / f"{name}-{_cache_key(model)}.onnx"


def _cache_key(model: nn.Module) -> str:
    return hashlib.sha256(f"{weights_digest(model)}:{torch.__version__}:{_OPSET}".encode()).hexdigest()[:32]


def _export_bytes(model: nn.Module) -> bytes:
    """The ONNX export of ``model`` in memory; any failure of the exporter is an :class:`OnnxUnusableError`."""
    buffer = io.BytesIO()
    try:
        export_onnx(model, buffer)
    except Exception as exc:
        # Deliberately broad: the exporter is third-party machinery; whatever it raises for this model means "no
        # ONNX here", the torch backend computes the same, and the reason is kept in the message.
        raise OnnxUnusableError(f"the ONNX export failed ({type(exc).__name__}: {first_line(exc)})") from exc
    return buffer.getvalue()


#: Rows of ``encode1``'s weight per panel of :class:`PackedEncode1`'s portable layout.
ENCODE1_PANEL = 32


def _onednn_encode1(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (out, in) reordered into oneDNN's layout for its matrix product, or None where this torch has no
    such operators, the weight is not a float32 CPU tensor, or oneDNN computes something else on a probe."""
    ops = torch.ops.mkldnn
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    if not (hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise")):
        return None
    try:
        packed = ops._reorder_linear_weight(weight.contiguous(), _PACK_BATCH_HINT)
        # A private operator is trusted only once seen to agree: a probe against the plain product of a few rows.
        probe = torch.randn(2, weight.shape[1], generator=torch.Generator().manual_seed(0))
        rows = sorted({0, weight.shape[0] // 2, weight.shape[0] - 1})
        with fp32_mode("ieee"):
            got = ops._linear_pointwise(probe, packed, None, "none", [], "")[:, rows]
        want = probe.double() @ weight[rows].double().T
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):  # what a private operator raises
        return None
    tolerance = 1e-4 * max(1.0, float(want.abs().max()))
    return packed if got.shape == want.shape and torch.allclose(got.double(), want, atol=tolerance, rtol=1e-4) else None


class PackedEncode1(nn.Module):
    """``encode1`` (``flat @ weight.T + bias``) with its 800 MB weight held once, in the layout the CPU's fastest
    product reads: oneDNN's reordered weight where this torch has the operators (checked on a probe), else panels of
    :data:`ENCODE1_PANEL` rows, (out / P, in, P), which any torch and device multiply in order.

    At batch 8 on a 2-core CPU (real shape 4096 x 50176, ``bench/encode1.py``): oneDNN's layout 26-31 ms, ONNX
    Runtime's own pre-packed copy 35 ms, the panels 55-63 ms, the row-major matrix in torch 98 ms. Same sums to
    rounding (about 5e-7 relative). :func:`pack_encode1` swaps it for the model's ``nn.Linear``; its state dict
    is ``nn.Linear``'s, so a packed model saves, copies and loads as the plain one does."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out, width = linear.weight.shape
        self.in_features, self.out_features = width, out
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.register_buffer("packed", torch.empty(0))
        self.layout = "panels"
        self._pack(linear.weight.detach())

    def _pack(self, weight: torch.Tensor) -> None:
        """Hold the (out, in) ``weight`` in the fastest layout available for it (see the class)."""
        onednn = _onednn_encode1(weight)
        self.layout = "onednn" if onednn is not None else "panels"
        self.packed = onednn if onednn is not None else self._panels(weight)

    @staticmethod
    def _panels(weight: torch.Tensor) -> torch.Tensor:
        """(out, in) -> (out / P, in, P), a last panel padded with zero rows (never returned)."""
        out, width = weight.shape
        panels = -(-out // ENCODE1_PANEL)
        if panels * ENCODE1_PANEL != out:
            weight = torch.cat([weight, weight.new_zeros(panels * ENCODE1_PANEL - out, width)])
        return weight.view(panels, ENCODE1_PANEL, width).transpose(1, 2).contiguous()

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat @ weight.T + bias`` for (..., in) -> (..., out), as ``nn.Linear`` (an empty batch included)."""
        lead = flat.shape[:-1]
        if self.layout == "onednn":
            rows = flat.reshape(-1, self.in_features).to(torch.float32).contiguous()
            if len(rows) == 0:
                return self.bias.new_empty(*lead, self.out_features)
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
            return out.reshape(*lead, self.out_features)
        rows = flat.reshape(-1, self.in_features).to(self.packed.dtype)
        panels = torch.matmul(rows, self.packed)  # (out / P, N, P)
        out = panels.permute(1, 0, 2).reshape(len(rows), self.packed.shape[0] * ENCODE1_PANEL)[:, : self.out_features]
        return (out + self.bias).reshape(*lead, self.out_features).contiguous()

    def unpacked_weight(self) -> torch.Tensor:
        """The (out, in) weight, as a new tensor (800 MB more for the real network)."""
        if self.layout == "onednn":
            return self.packed.to_dense()
        rows = self.packed.transpose(1, 2).reshape(-1, self.in_features)
        return rows[: self.out_features].contiguous()

    @property
    def weight(self) -> torch.Tensor:
        """``nn.Linear``'s ``weight``, for code written against it: a new (out, in) tensor at each read (800 MB for
        the real network); i2v itself never reads it."""
        return self.unpacked_weight()

    def _apply(self, fn: Any, recurse: bool = True) -> PackedEncode1:
        # .to(), .cuda(), .double(), ... : oneDNN's opaque tensor goes nowhere. Where ``fn`` keeps a float32 CPU
        # tensor, it stays as it is; elsewhere the weight moves as panels, and back to float32 on the CPU from
        # elsewhere (.double().float(), .cuda().cpu()) it is packed for oneDNN again.
        if self.layout == "onednn":
            target = fn(torch.empty(0))
            if target.device.type == "cpu" and target.dtype == torch.float32:
                return self._apply_to_bias(fn)
            self.layout, self.packed = "panels", self._panels(self.packed.to_dense())
        before = (self.packed.device, self.packed.dtype)
        super()._apply(fn, recurse)
        after = (self.packed.device, self.packed.dtype)
        if after != before and after == (torch.device("cpu"), torch.float32):
            self._pack(self.unpacked_weight())
        return self

    def _apply_to_bias(self, fn: Any) -> PackedEncode1:
        """``fn`` applied to the bias alone: the oneDNN weight stays where it is, as it is."""
        packed, self.packed = self.packed, torch.empty(0)
        try:
            super()._apply(fn)
        finally:
            self.packed = packed
        return self

    def __getstate__(self) -> dict[str, Any]:
        # Pickling and copy.deepcopy: oneDNN's opaque tensor has no storage to copy; the plain weight travels instead.
        state = self.__dict__.copy()
        state["_buffers"] = {**self._buffers, "packed": self.unpacked_weight()}
        state["layout"] = "dense"
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self.layout == "dense":
            self._pack(self._buffers["packed"])

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # As nn.Linear's: a packed model's state dict and digest are those of the network it computes.
        destination[prefix + "weight"] = self.unpacked_weight()
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any) -> None:
        # args: local_metadata, strict, missing_keys, unexpected_keys, error_msgs (nn.Module's protocol)
        missing, errors = args[2], args[4]
        weight, bias = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        missing.extend(prefix + name for name, value in (("weight", weight), ("bias", bias)) if value is None)
        if weight is None or bias is None:
            return
        if tuple(weight.shape) != (self.out_features, self.in_features) or tuple(bias.shape) != (self.out_features,):
            errors.append(f"size mismatch for {prefix}weight/bias: {tuple(weight.shape)}, {tuple(bias.shape)}")
            return
        with torch.no_grad():
            self.bias.copy_(bias)
            if self.layout == "onednn":
                self._pack(weight.detach().to(torch.float32, copy=True))
            else:
                self.packed.copy_(self._panels(weight.detach().to(self.packed)))


def pack_encode1(model: Illust2VecNet) -> None:
    """Give a feature network on the CPU its ``encode1`` as :class:`PackedEncode1` (in place; once). The model's
    ``nn.Linear`` goes: the 800 MB weight is held once, in the packed layout."""
    if model.arch.kind == TAG or not isinstance(model.encode1, nn.Linear) or model_device(model).type != "cpu":
        return
    with torch.inference_mode(False), torch.no_grad():  # a normal buffer, usable outside inference mode too
        model.encode1 = PackedEncode1(model.encode1)


#: The name of the feature network's export: its trunk, up to the flattened input of ``encode1``
#: (:class:`PackedEncode1` runs in torch on the session's output).
FEATURE_EXPORT = "feature-trunk"
#: Names that earlier versions gave the same network's export: their cached files (131 MB and its optimised graph
#: for the real feature network) are deleted once the export under the new name is in use.
_SUPERSEDED = {FEATURE_EXPORT: ("feature-whole-wx", "feature-whole")}


class _EarlierFeatureNet(nn.Module):
    """The parameters of the module earlier versions exported for the feature network (its trunk, then ``bias``,
    encode1's weight fed): their cache key, to find their files."""

    def __init__(self, model: Illust2VecNet) -> None:
        super().__init__()
        self.features = model.features
        self.bias = model.encode1.bias


def _drop_superseded(export: Path, name: str, model: Illust2VecNet) -> None:
    """Delete the files earlier versions cached for the same network (same weights, torch and opset) under the
    names ``name`` replaced. Their key is computed only when such a file is there (it hashes the trunk)."""
    earlier = _SUPERSEDED.get(name, ())
    optimised = export.parent.with_name(OPTIMISED_FOLDER)
    if not any(next(export.parent.glob(f"{old}-*.onnx"), None) for old in earlier):
        return
    key = _cache_key(_EarlierFeatureNet(model))
    for old in earlier:
        with contextlib.suppress(OSError):
            for path in [export.with_name(f"{old}-{key}.onnx"), *optimised.glob(f"{old}-{key}-*.onnx")]:
                path.unlink(missing_ok=True)


class FeatureTrunk(nn.Module):
    """The feature network up to ``encode1``'s input, flattened: what ONNX Runtime runs (fp32 or int8), the
    product of :class:`PackedEncode1` following in torch."""

    def __init__(self, model: Illust2VecNet) -> None:
        super().__init__()
        self.features = model.features
        self.__dict__["network"] = model  # not a submodule: the export and its cache key hold the trunk alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


class OnnxRuntimeNet(_Described):
    """The network as an ONNX Runtime CPU session: a callable from a (N, 3, INPUT_SIZE, INPUT_SIZE) tensor to its
    output.

    The tag network runs whole in the session. The feature network's trunk does, and its ``encode1`` follows in
    torch on the session's output (:class:`PackedEncode1`, swapped into the model by :func:`pack_encode1`): the
    800 MB matrix is held once, and its product is as fast as ONNX Runtime's on its own pre-packed copy, which a
    plain session holds beside the model's.

    The export is cached (:func:`onnx_cache_path`). A cached file ONNX Runtime cannot load (empty, cut short by
    an interrupted write, made by another version) is deleted and exported again, with a note; a cache that
    cannot be written keeps the export in memory. Raises :class:`OnnxUnusableError` when the export fails or
    ONNX Runtime refuses a fresh export.
    """

    def __init__(self, model: Illust2VecNet, cache_dir: Path | None = None, threads: int | None = None) -> None:
        exported: nn.Module = model
        name = model.arch.kind
        self.head: nn.Module | None = None
        if model.arch.kind != TAG:
            pack_encode1(model)
            exported, name, self.head = FeatureTrunk(model), FEATURE_EXPORT, model.encode1
        self.notes = []

        threads = threads or torch.get_num_threads()  # as many as PyTorch would use

        def session(model_or_path: str | bytes, save_to: Path | None = None) -> Any:
            return new_session(model_or_path, threads, save_to)

        path = onnx_cache_path(exported, name, cache_dir)
        self.export: Path | None = path
        where = "cached export"
        if not _is_utf8(str(path)):  # ONNX Runtime takes file names as UTF-8 text only
            self.export, where = (
                None,
                "export kept in memory: ONNX Runtime cannot open a cache folder not named in UTF-8",
            )
            try:
                self.session = session(_export_bytes(exported))
            except ort_errors() as exc:
                raise OnnxUnusableError(f"ONNX Runtime cannot load the export ({first_line(exc)})") from None
        else:
            self.session = open_optimised(path, threads)
        if self.session is None and path.is_file():
            try:
                self.session = session_saving_optimised(session, path)
            except ort_errors() as exc:
                note = f"the cached ONNX export {path} could not be loaded ({first_line(exc)}): exported it again"
                self.notes.append(note)
                warnings.warn(note, BackendWarning, stacklevel=3)
                with contextlib.suppress(OSError):
                    path.unlink()
        if self.session is None:
            data = _export_bytes(exported)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes(path, data)
            except (OSError, OutputError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
                where = f"export kept in memory: cannot write the cache ({reason})"
                self.export = None
            try:
                self.session = session_saving_optimised(session, path) if self.export else session(data)
            except ort_errors() as exc:
                with contextlib.suppress(OSError):
                    path.unlink()
                raise OnnxUnusableError(f"ONNX Runtime cannot load the fresh export ({first_line(exc)})") from None
        if self.export is not None:
            _drop_superseded(self.export, name, model)
        self.input_name = self.session.get_inputs()[0].name
        part = ", encode1 packed in torch" if self.head is not None else ""
        self.name = f"onnxruntime fp32 on cpu{part} ({where})"

    @classmethod
    def from_session(cls, session: Any, export: Path) -> OnnxRuntimeNet:
        """The predictor of a tag network's session opened on its cached ``export`` without the model in memory
        (:func:`i2v_cli.ortcache.recall_export`)."""
        net = cls.__new__(cls)
        net.head, net.notes, net.export, net.session = None, [], export, session
        net.input_name = session.get_inputs()[0].name
        net.name = "onnxruntime fp32 on cpu (cached export)"
        return net

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run a float32 CPU batch through the session."""
        (y,) = self.session.run(None, {self.input_name: x.detach().to(torch.float32).contiguous().numpy()})
        out = torch.from_numpy(y)
        if self.head is None:
            return out
        with fp32_mode("ieee"):
            return self.head(out)


# --------------------------------------------------------------------------------------------------------------
# Choosing and running


def predict(
    net: Predictor, inputs: torch.Tensor | Sequence[torch.Tensor], device: torch.device, batch_size: int | None = None
) -> np.ndarray:
    """``net`` over network inputs (a (N, 3, S, S) tensor, or a list of (3, S, S) ones, stacked a batch at a time;
    S is INPUT_SIZE), ``batch_size`` at a time (all at once when None), on ``device``; float32 (N, out)."""
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

    fp32 keeps results within 1e-5 of eager IEEE fp32; tf32 (CUDA), bf16 and fp16 trade about 1e-2 in scores for
    speed (bench/precision_cuda.py). The result's ``describe()`` says what runs it; when ONNX Runtime cannot be
    used the torch backend runs instead, with a note and a :class:`~i2v_cli.errors.BackendWarning`.
    """
    device = model_device(model)
    check_precision(precision, device)
    model = model.eval()
    if resolve_backend(backend, device, precision) == "onnxruntime":
        if precision == "int8":
            from .quantize import prepare_int8

            return prepare_int8(model, cache_dir)
        try:
            return OnnxRuntimeNet(model, cache_dir)
        except OnnxUnusableError as exc:
            net = pack_for_cpu(model)
            note = f"ONNX Runtime not used: {exc}; running {net.name} instead"
            net.notes.insert(0, note)
            warnings.warn(note, BackendWarning, stacklevel=2)
            return net
    if device.type == "cpu" and precision == "fp32":
        return pack_for_cpu(model)
    return TorchNet(model, precision)


def describe(net: Predictor) -> str:
    """Which backend and arithmetic run a prepared network, in words, with its notes (for the summary line)."""
    describe_net = getattr(net, "describe", None)
    return describe_net() if callable(describe_net) else type(net).__name__
