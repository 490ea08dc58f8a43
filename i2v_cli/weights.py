"""Weight file formats: Caffe ``.caffemodel`` (V1 and V2), PyTorch ``.pth`` state dicts and safetensors.

Everything is read into the model's own naming (``features.conv1_1.weight`` ... ``conv6_4.*`` / ``encode1.*``,
see :func:`i2v_cli.model.layer_key`), checked against the architecture it describes, and converted to
safetensors with a record of where it came from. Where weight files are looked for is :mod:`i2v_cli.store`'s
job. Every failure is a :class:`~i2v_cli.errors.WeightsError`
(or a subclass) whose one-line message names the file; the library never prints.

The Caffe schema is read at run time from ``proto/caffe.desc`` through protobuf's public descriptor API (no
generated ``_pb2`` module, which would pin a protobuf runtime). Blob values are taken as whole arrays, never
as Python floats: with protobuf's upb backend through its ``__array__`` support, elsewhere through a view of
the same schema in which the packed ``data`` field reads as raw bytes (a packed repeated float is one
length-delimited record on the wire), so a 1 GB caffemodel converts in seconds on any backend.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import pickle
import re
import stat
import struct
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from .atomic import AtomicFile, describe_oserror, same_file
from .config import CONV_NAMES, FEATURE, TAG
from .errors import ModelKindError, OutputError, WeightsError, WeightsNotFoundError, WriteError, first_line
from .hashing import sha256_file
from .model import Architecture, Illust2VecNet, build_model, check_state_dict, layer_key, remap_legacy_state_dict
from .sniff import IMAGE_KINDS, describe, sniff
from .store import (
    CAFFEMODEL_FILES,
    WEIGHT_FILES,
    default_weights_dir,
    file_identity,
    remembered_digest,
    resolve_weights,
)

# The store's names, re-exported so that ``from i2v_cli.weights import resolve_weights`` keeps working; new code
# imports them from :mod:`i2v_cli.store`.
from .writers import display

__all__ = [
    "CAFFEMODEL_FILES",
    "WEIGHT_FILES",
    "WeightsInfo",
    "caffe_message",
    "convert",
    "default_weights_dir",
    "load_model",
    "load_weights",
    "read_caffemodel",
    "read_state_dict_pth",
    "resolve_weights",
    "save_safetensors",
]

PathLike = str | os.PathLike[str]

#: Caffe layers that carry the parameters of an Illustration2Vec network.
PARAM_LAYERS = (*CONV_NAMES, "conv6_4", "encode1", "encode2")
_OWN_KEYS = frozenset(layer_key(name, p) for name in PARAM_LAYERS for p in ("weight", "bias"))
_HEAD = {TAG: "conv6_4", FEATURE: "encode1"}

# safetensors metadata keys (values are strings).
_META_PREFIX = "i2v."
_SNIFF_BYTES = 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsInfo:
    """What a weight file holds and where it came from (stored as safetensors metadata by :func:`convert`)."""

    kind: str  # "tag" or "feature"
    widths: tuple[int, ...]  # output channels of conv1_1 ... conv6_3
    feature_dim: int  # encode1 outputs (0 for a tag model)
    num_tags: int  # outputs of conv6_4 / encode2
    source: str  # file name of the original weights (the caffemodel a safetensors file was made from)
    sha256: str  # SHA-256 of that source file, hex
    source_format: str  # "caffemodel-v1", "caffemodel-v2", "pth" or "safetensors"
    #: Digest of the tensors as loaded (:func:`tensors_digest`), whatever the file's format: what says two runs
    #: used the same network; empty when not computed. Never stored in a file's metadata, which cannot vouch for it.
    tensors: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (widths as a list), for ``i2v weights info``."""
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    def to_metadata(self) -> dict[str, str]:
        """The fields as safetensors metadata (strings only)."""
        return {
            _META_PREFIX + "kind": self.kind,
            _META_PREFIX + "widths": ",".join(map(str, self.widths)),
            _META_PREFIX + "feature_dim": str(self.feature_dim),
            _META_PREFIX + "num_tags": str(self.num_tags),
            _META_PREFIX + "source": self.source,
            _META_PREFIX + "source_sha256": self.sha256,
            _META_PREFIX + "source_format": self.source_format,
        }


# --------------------------------------------------------------------------------------------------------------
# Caffe schema


@functools.cache
def _caffe_classes(raw_blobs: bool) -> dict[str, type[Message]]:
    """Message classes of the caffe.desc schema; with ``raw_blobs``, BlobProto's packed value fields read as bytes."""
    try:
        data = resources.files("i2v_cli.proto").joinpath("caffe.desc").read_bytes()
    except OSError as exc:  # a broken installation, not a user's file
        raise WeightsError(f"cannot read the packaged Caffe schema (i2v_cli/proto/caffe.desc): {exc}") from None
    fds = descriptor_pb2.FileDescriptorSet.FromString(data)
    pool = descriptor_pool.DescriptorPool()
    for fdp in fds.file:
        if raw_blobs:
            for msg in fdp.message_type:
                if msg.name == "BlobProto":
                    for field in msg.field:
                        if field.name in ("data", "double_data"):
                            field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
                            field.ClearField("options")
        pool.AddSerializedFile(fdp.SerializeToString())
    package = fds.file[0].package
    names = ("NetParameter", "LayerParameter", "V1LayerParameter", "BlobProto", "BlobShape")
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{n}")) for n in names}


def caffe_message(name: str) -> type[Message]:
    """The Caffe schema's message class ``name`` (``NetParameter``, ``BlobProto``, ...), to write caffemodels."""
    return _caffe_classes(False)[name]


#: None: decide from the protobuf runtime; True/False force the array path or the raw-bytes path.
_USE_ARRAY_PROTOCOL: bool | None = None


def _array_protocol() -> bool:
    """Whether repeated float fields convert to numpy in one copy (upb's ``__array__``), not float by float."""
    if _USE_ARRAY_PROTOCOL is not None:
        return _USE_ARRAY_PROTOCOL
    # Only upb's container copies its C array in one go; the pure-Python backend's __array__ (where present)
    # still goes float by float. Anything else takes the raw-bytes path, which is fast everywhere.
    container = type(caffe_message("BlobProto")().data)
    return container.__module__.startswith("google._upb") and hasattr(container, "__array__")


# --------------------------------------------------------------------------------------------------------------
# Caffemodel


def read_caffemodel(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the parameters of a Caffe V1 or V2 caffemodel into this package's state-dict naming."""
    state_dict, _, _ = _read_caffemodel(Path(path))
    return state_dict


def _read_caffemodel(path: Path) -> tuple[dict[str, torch.Tensor], int, str]:
    """Parameters, Caffe format version (1 or 2) and the file's SHA-256."""
    raw = not _array_protocol()
    net_cls = _caffe_classes(raw)["NetParameter"]
    data = _read_bytes(path)
    kind_of_file = _sniff(data[:_SNIFF_BYTES])
    # Hash while parsing: hashlib releases the GIL on large buffers, so the two overlap on a second core.
    hasher = hashlib.sha256()
    hashing = threading.Thread(target=hasher.update, args=(data,), daemon=True)
    hashing.start()
    net = net_cls()
    try:
        net.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        if kind_of_file != "caffemodel":
            raise WeightsError(f"{path} is not a weight file: it looks like {kind_of_file}") from None
        raise WeightsError(
            _not_a_caffemodel(path) or f"{path} is not a valid caffemodel (truncated or corrupt: {first_line(exc)})"
        ) from None
    finally:
        hashing.join()
    sha256 = hasher.hexdigest()
    del data  # the parsed message holds its own copy; free the file's before converting blobs
    if len(net.layer) and len(net.layers):
        raise WeightsError(f"{path} holds both V1 'layers' and V2 'layer' definitions: not a valid caffemodel")
    version = 2 if len(net.layer) else 1
    layers = net.layer if version == 2 else net.layers
    if not len(layers):
        if kind_of_file != "caffemodel":
            raise WeightsError(f"{path} is not a weight file: it looks like {kind_of_file}")
        raise WeightsError(_not_a_caffemodel(path) or f"{path} is not a caffemodel: it holds no layers")
    state_dict: dict[str, torch.Tensor] = {}
    for layer in layers:
        if layer.name not in PARAM_LAYERS or not len(layer.blobs):
            continue
        if layer_key(layer.name, "weight") in state_dict:
            raise WeightsError(f"{path} holds layer {layer.name} twice")
        if len(layer.blobs) != 2:
            raise WeightsError(f"{path}: layer {layer.name} has {len(layer.blobs)} blobs, expected 2 (weight, bias)")
        ndim = 4 if layer.name.startswith("conv") else 2
        for blob, param, want in zip(layer.blobs, ("weight", "bias"), (ndim, 1), strict=True):
            state_dict[layer_key(layer.name, param)] = _blob_tensor(blob, want, raw, f"{path}: {layer.name} {param}")
    if not state_dict:
        raise WeightsError(f"{path} holds none of Illustration2Vec's layers (conv1_1 ... conv6_4, encode1)")
    _check_layer_types(layers, version, path)
    _check_layers_present(layers, TAG if layer_key("conv6_4", "weight") in state_dict else FEATURE, path)
    return state_dict, version, sha256


def _not_a_caffemodel(path: Path) -> str | None:
    """For a file of no known format named like a safetensors or PyTorch file, a message saying so (calling it a
    broken caffemodel would send the user looking for the wrong problem); None for any other name."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return (
            f"{path} is not a safetensors file (it lacks the safetensors header) nor any other weight format i2v "
            "reads: unrecognised binary data (truncated at the start, or not weights at all)"
        )
    if suffix in (".pth", ".pt", ".ckpt"):
        return (
            f"{path} is not a PyTorch file (neither a zip archive nor a pickle) nor any other weight format i2v "
            "reads: unrecognised binary data (truncated at the start, or not weights at all)"
        )
    return None


# The layers of the released networks, by name, and the kind of computation each is (see tests/data/golden's
# README): the ReLU after each convolution, the max poolings, then the tag head (conv6_4, average pool6, sigmoid
# prob) or the feature head (encode1, its sigmoid, encode2).
_LAYER_TYPES: dict[str, str] = {
    **{name: "Convolution" for name in (*CONV_NAMES, "conv6_4")},
    **{"relu" + name.removeprefix("conv"): "ReLU" for name in CONV_NAMES},
    **{f"pool{i}": "Pooling" for i in range(1, 7)},
    "prob": "Sigmoid",
    "encode1": "InnerProduct",
    "encode1neuron": "Sigmoid",
    "encode2": "InnerProduct",
}
# Layers that take no part in computing the outputs: data sources, dropout (identity at inference), losses.
_INERT = frozenset({"data", "input", "imagedata", "hdf5data", "memorydata", "dummydata", "windowdata", "dropout",
                    "silence", "split", "accuracy"})  # fmt: skip


def _canonical(layer_type: str) -> str:
    """A layer type in one spelling for V1 enum names and V2 strings (``INNER_PRODUCT`` and ``InnerProduct``)."""
    return layer_type.replace("_", "").lower()


def _pair(message: Any, setting: str, default: int) -> tuple[int, int]:
    """A Caffe 2-D setting (``kernel``, ``pad``, ``stride``) as (height, width): ``SETTING_h``/``SETTING_w`` when
    either is given (the other then ``default``), else the one value (or two, for a repeated field), else the
    default (Caffe's)."""
    h, w = f"{setting}_h", f"{setting}_w"
    if message.HasField(h) or message.HasField(w):
        h_value = getattr(message, h) if message.HasField(h) else default
        return h_value, getattr(message, w) if message.HasField(w) else default
    single = getattr(message, "kernel_size" if setting == "kernel" else setting)
    values = [single] if isinstance(single, int) else list(single)
    if not values:
        return default, default
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def _settings_differing(layer: Any, kind: str) -> Iterator[tuple[str, object, object]]:
    """The settings of a known layer that differ from what i2v computes for it, as (setting, value in the file,
    value in Illustration2Vec): 3x3 convolutions padded by 1 with stride 1, 2x2 max pooling with stride 2 (pool6:
    average over the whole 7x7 map), plain ReLUs, InnerProducts of (out, in) weights. A layer that states no
    settings is taken as the release's (its caffemodels state them all)."""
    if kind == "convolution" and layer.HasField("convolution_param"):
        c = layer.convolution_param
        yield from _differing("kernel", _pair(c, "kernel", 0), (3, 3))
        yield from _differing("pad", _pair(c, "pad", 0), (1, 1))
        yield from _differing("stride", _pair(c, "stride", 1), (1, 1))
        yield from _differing("dilation", tuple(c.dilation) or (1,), (1,) * max(1, len(c.dilation)))
        yield from _differing("group", c.group, 1)
        yield from _differing("bias_term", c.bias_term, True)
        yield from _differing("axis", 1 if c.axis == -3 else c.axis, 1)  # -3: axis 1 of (N, C, H, W), as Caffe counts
    elif kind == "pooling" and layer.HasField("pooling_param"):
        p = layer.pooling_param
        enum = p.DESCRIPTOR.fields_by_name["pool"].enum_type
        method = enum.values_by_number[p.pool].name if p.pool in enum.values_by_number else str(p.pool)
        yield from _differing("pad", _pair(p, "pad", 0), (0, 0))
        if layer.name == "pool6":  # the tag head: the mean over conv6_4's 7x7 map
            yield from _differing("pool", method, "AVE")
            if not p.global_pooling:
                yield from _differing("kernel", _pair(p, "kernel", 0), (7, 7))
            return
        yield from _differing("pool", method, "MAX")
        yield from _differing("global_pooling", p.global_pooling, False)
        yield from _differing("kernel", _pair(p, "kernel", 0), (2, 2))
        yield from _differing("stride", _pair(p, "stride", 1), (2, 2))
    elif kind == "relu" and layer.HasField("relu_param"):
        yield from _differing("negative_slope", layer.relu_param.negative_slope, 0.0)
    elif kind == "innerproduct" and layer.HasField("inner_product_param"):
        q = layer.inner_product_param
        yield from _differing("transpose", q.transpose, False)
        yield from _differing("bias_term", q.bias_term, True)
        # the input's axis 1 counted from the end: -3 of encode1's (N, C, H, W), -1 of encode2's (N, 4096)
        yield from _differing("axis", 1 if q.axis == (-3 if layer.name == "encode1" else -1) else q.axis, 1)


def _differing(setting: str, value: object, want: object) -> Iterator[tuple[str, object, object]]:
    """``(setting, value, want)`` once if they differ, as a setting's name and its two values in words."""
    if value != want:
        yield setting, _shown(value), _shown(want)


def _shown(value: object) -> object:
    """(3, 3) as 3x3, True as true: values as they read in a prototxt."""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return value


def _check_layers_present(layers: Any, kind: str, path: Path) -> None:
    """Refuse a caffemodel without a layer that computes between the weights: a ReLU after a convolution, a max
    pooling, or the tag model's average pool6 (without them Caffe computes another network; the convolutions and
    encode1 are checked with the weights). ``prob`` and what follows encode1 are not needed: the outputs are
    taken before them, and a training net holds a loss layer there."""
    names = {layer.name for layer in layers}
    needed = [*("relu" + n.removeprefix("conv") for n in CONV_NAMES), *(f"pool{i}" for i in range(1, 6))]
    if kind == TAG:
        needed.append("pool6")
    missing = [n for n in needed if n not in names]
    if missing:
        raise WeightsError(
            f"{path}: layer {missing[0]} is missing{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: "
            "Caffe would compute another network than Illustration2Vec without it"
        )


def _check_layer_types(layers: Any, version: int, path: Path) -> None:
    """Refuse a caffemodel whose layers compute something else than Illustration2Vec does: a known layer of
    another type (a Softmax as ``prob``, a Deconvolution as ``conv3_1``), or an extra layer that would change
    the outputs (BatchNorm, Scale, LRN, ...). Data, dropout and loss layers are ignored, as at inference."""
    enum = caffe_message("V1LayerParameter").DESCRIPTOR.enum_types_by_name["LayerType"]
    for layer in layers:
        if version == 2:
            shown = layer.type
        else:
            shown = enum.values_by_number[layer.type].name if layer.type in enum.values_by_number else str(layer.type)
        kind = _canonical(shown) if shown not in ("", "NONE") else ""
        expected = _LAYER_TYPES.get(layer.name)
        if expected is not None:
            if kind and kind != _canonical(expected):
                raise WeightsError(
                    f"{path}: layer {layer.name} is a {shown} layer, not a {expected} as in Illustration2Vec "
                    "(i2v would compute something else than this file describes)"
                )
            for setting, value, want in _settings_differing(layer, _canonical(expected)):
                raise WeightsError(
                    f"{path}: layer {layer.name} has {setting} {value}, where Illustration2Vec has {want} "
                    "(i2v would compute something else than this file describes)"
                )
        elif not kind:
            raise WeightsError(f"{path}: layer {layer.name!r} has no type: not an Illustration2Vec network")
        elif kind not in _INERT and not kind.endswith("loss"):
            raise WeightsError(
                f"{path}: layer {layer.name!r} is a {shown} layer, which Illustration2Vec does not have "
                "(i2v would compute something else than this file describes)"
            )


def _blob_shape(blob: Message, where: str) -> tuple[int, ...]:
    """A blob's declared shape: ``shape.dim`` (V2), else the legacy num/channels/height/width (V1)."""
    if blob.HasField("shape"):
        shape = tuple(int(d) for d in blob.shape.dim)
    elif any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        raise WeightsError(f"{where} has no shape")
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where} has a negative dimension in its shape {shape}")
    return shape


def _blob_values(blob: Message, count: int, raw: bool) -> np.ndarray:
    """A blob's values as a flat float32 array (``data``, else ``double_data``), without Python floats."""
    if not raw:
        values = np.asarray(blob.data if len(blob.data) else blob.double_data)
        return values.astype(np.float32, copy=False)
    chunks, dtype = (blob.data, "<f4") if len(blob.data) else (blob.double_data, "<f8")
    buf = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(buf) % np.dtype(dtype).itemsize == 0 and len(buf) // np.dtype(dtype).itemsize == count:
        return np.frombuffer(buf, dtype).astype(np.float32)  # astype copies: the tensor owns writable memory
    # Values stored unpacked (legal on the wire, never written by Caffe) are unknown fields to the raw view:
    # read this blob again with the real schema.
    real = _caffe_classes(False)["BlobProto"].FromString(blob.SerializeToString())
    return np.fromiter(real.data if len(real.data) else real.double_data, np.float32)


def _blob_tensor(blob: Message, ndim: int, raw: bool, where: str) -> torch.Tensor:
    """A blob as a float32 tensor of ``ndim`` dimensions, after checking its size against its declared shape."""
    shape = _blob_shape(blob, where)
    count = math.prod(shape)
    values = _blob_values(blob, count, raw)
    if values.size != count:
        raise WeightsError(f"{where} holds {values.size} values but its shape {shape} needs {count}")
    # V1 pads to 4-D with leading ones (an InnerProduct weight is 1x1xOUTxIN, a bias 1x1x1xOUT).
    while len(shape) > ndim and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != ndim:
        raise WeightsError(f"{where} has shape {shape}, expected {ndim} dimensions")
    return torch.from_numpy(np.ascontiguousarray(values.reshape(shape)))


# --------------------------------------------------------------------------------------------------------------
# PyTorch state dicts


def read_state_dict_pth(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict (this package's naming or an earlier port's) with ``weights_only`` loading."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the library never prints
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc))
        if refused:
            raise WeightsError(
                f"{path} holds pickled Python objects ({refused.group(1)}), not only tensors (a whole saved model?); "
                "i2v loads plain state dicts only (torch.load weights_only): re-save it with "
                "torch.save(model.state_dict(), ...)"
            ) from None
        raise WeightsError(
            f"{path} is not a readable PyTorch file (a pickle that torch.load(weights_only=True) refuses)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise WeightsError(f"{path} is not a readable PyTorch file (truncated or corrupt: {first_line(exc)})") from None
    state_dict = _find_state_dict(obj)
    if state_dict is None:
        raise WeightsError(f"{path} holds no state dict (expected a dict of tensors)")
    return _to_own_naming(state_dict, path)


def _find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """The dict of tensors in ``obj``: ``obj`` itself, or a checkpoint's ``state_dict`` / ``model`` entry."""
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return obj
    for key in ("state_dict", "model", "model_state_dict", "net"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            found = _find_state_dict(inner)
            if found is not None:
                return found
    return None


def _to_own_naming(state_dict: Mapping[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state_dict`` in this package's naming, as float32 tensors (an earlier port's keys are renamed)."""
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.layout != torch.strided:
            raise WeightsError(f"{path}: {key} is a sparse tensor ({value.layout}); i2v reads dense tensors only")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise WeightsError(f"{path}: {key} is not a floating-point tensor")
        if value.dim() == 0:
            raise WeightsError(f"{path}: {key} is a single number (a 0-d tensor), not a layer's weights")
        if value.is_meta:
            raise WeightsError(f"{path}: {key} is a meta tensor (a shape without data): not a weight file to use")
    if not set(state_dict) <= _OWN_KEYS:
        try:
            state_dict = remap_legacy_state_dict(state_dict)
        except WeightsError as exc:
            raise WeightsError(f"{path} {exc}" if str(exc).startswith("holds") else f"{path}: {exc}") from None
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------------------------
# safetensors


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike, metadata: Mapping[str, str]) -> None:
    """Write ``state_dict`` (float32 tensors) with string ``metadata`` as a safetensors file at ``path``.

    Written through :mod:`i2v_cli.atomic` (temp file beside the symlink-resolved target, fsync, rename; a pipe or
    ``/dev/null`` is written in place, never replaced), streamed tensor by tensor: no second copy of a 1 GB
    model in memory. A terminal is refused, as gzip refuses to write compressed data to one.
    """
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sorted(state_dict.items())}
    header = _safetensors_header(tensors, {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}})
    folder = Path(path).parent  # e.g. the cache folder that `i2v weights convert X -o ~/.cache/i2v/...` names
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_oserror(folder, exc)) from None
    out = AtomicFile(path)
    try:
        if out.stream.isatty():
            raise OutputError(f"{path} is a terminal: safetensors is binary; name a file (or redirect the output)")
        out.stream.write(header)
        for tensor in tensors.values():
            if tensor.numel():
                out.stream.write(memoryview(tensor.numpy()).cast("B"))
    except BrokenPipeError:  # the reader of a pipe went away: exit 141, quietly, as every command
        out.discard()
        raise
    except OSError as exc:  # a full disk, an I/O error: exit 3
        out.discard()
        raise WriteError(describe_oserror(path, exc)) from None
    except BaseException:
        out.discard()
        raise
    out.commit()


def _safetensors_header(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding ``tensors`` (float32, in this order)."""
    if sys.byteorder != "little":  # safetensors stores little-endian values; tensors are written as they lie
        raise WeightsError("writing safetensors needs a little-endian machine")
    entries: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * 4
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return struct.pack("<Q", len(text)) + text


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with any failure as a WeightsError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with _utf8_path(path) as name, safe_open(name, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:  # what safe_open raises for a bad file
        raise WeightsError(
            f"{display(str(path))} is not a valid safetensors file (truncated or corrupt: {first_line(exc)})"
        ) from None
    return tensors, meta


@contextlib.contextmanager
def _utf8_path(path: Path) -> Iterator[str]:
    """``path`` as a name the safetensors library accepts: it refuses names that are not UTF-8, which Linux
    allows. Such a file is opened here and named through ``/proc/self/fd`` while the block runs."""
    name = str(path)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield name


# --------------------------------------------------------------------------------------------------------------
# Any format


def load_weights(path: PathLike, kind: str | None = None) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Read a .safetensors, .caffemodel or .pth file (told apart by content) into a checked state dict and its info,
    refusing a tag model where ``kind`` asks for a feature model and back."""
    if kind not in (None, TAG, FEATURE):
        raise ValueError(f"kind must be {TAG!r}, {FEATURE!r} or None, not {kind!r}")
    path = Path(path)
    head = _read_head(path)
    try:
        before: list[int] | None = file_identity(path)
    except OSError:
        before = None
    fmt = _sniff(head)
    source, sha256 = display(path.name), ""  # provenance is UTF-8 text: a name's odd bytes as \xNN
    if fmt == "safetensors":
        tensors, meta = _read_safetensors(path)
        state_dict = _to_own_naming(tensors, path)
        source = meta.get(_META_PREFIX + "source", "")
        sha256 = meta.get(_META_PREFIX + "source_sha256", "")
        source_format = meta.get(_META_PREFIX + "source_format", "safetensors")
        if not (source and sha256):
            source, sha256, source_format = display(path.name), _sha256_file(path), "safetensors"
    elif fmt == "torch":
        state_dict = read_state_dict_pth(path)
        sha256, source_format = _sha256_file(path), "pth"
    else:  # caffemodel, or something that is not a weight file: the caffemodel reader tells which
        state_dict, version, sha256 = _read_caffemodel(path)
        source_format = f"caffemodel-v{version}"
    arch = _check_state_dict(state_dict, path)
    for key, tensor in state_dict.items():
        if not bool(torch.isfinite(tensor).all()):
            raise WeightsError(f"{path}: {key} holds NaN or infinite values: the network would compute nonsense")
    tensors = remembered_digest(path, before, lambda: tensors_digest(state_dict))
    info = WeightsInfo(arch.kind, arch.widths, arch.feature_dim, arch.num_tags, source, sha256, source_format, tensors)
    if fmt == "safetensors":
        _check_metadata(meta, info, path)
    if kind is not None and info.kind != kind:
        raise ModelKindError(_kind_message(path, info.kind, kind))
    return state_dict, info


def tensors_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict in i2v's naming: each tensor's name, dtype, shape and bytes, in name order. The same
    network gives the same digest from a caffemodel, a ``.pth`` or a safetensors file."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _check_state_dict(state_dict: Mapping[str, torch.Tensor], path: Path) -> Architecture:
    """The architecture ``state_dict`` describes, after checking every key and shape; errors name the file."""
    try:
        return check_state_dict(state_dict)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None


def _check_metadata(meta: Mapping[str, str], info: WeightsInfo, path: Path) -> None:
    """Refuse a safetensors file whose i2v metadata disagrees with its tensors (an edited or mixed-up file)."""
    kind = meta.get(_META_PREFIX + "kind")
    widths = meta.get(_META_PREFIX + "widths")
    if kind is not None and kind != info.kind:
        raise WeightsError(f"{path}: its metadata says {kind} model but its tensors make a {info.kind} model")
    if widths is not None and widths != ",".join(map(str, info.widths)):
        raise WeightsError(f"{path}: its metadata says widths {widths} but its tensors have {info.widths}")


def convert(src: PathLike, dst: PathLike, *, source_name: str | None = None) -> WeightsInfo:
    """Convert any supported weight file to safetensors at ``dst``, with its provenance in the metadata.

    ``dst`` naming ``src`` itself (the same file, through a link or not) is refused before anything is read;
    ``dst`` is written through :func:`save_safetensors` (atomic; a symlink's target gets the file; a pipe or
    ``/dev/null`` is written in place). ``source_name`` replaces ``src``'s file name in the provenance (for a
    file downloaded under a temporary name).
    """
    if same_file(src, dst):
        raise OutputError(f"{dst} is the input file {src}: write the safetensors file under another name")
    state_dict, info = load_weights(src)
    if source_name is not None and info.source == display(Path(src).name):
        info = dataclasses.replace(info, source=source_name)
    save_safetensors(state_dict, dst, info.to_metadata())
    return info


def load_model(
    path: PathLike, kind: str | None = None, device: str | torch.device = "cpu"
) -> tuple[Illust2VecNet, WeightsInfo]:
    """Build the network a weight file describes, refusing a tag model where a feature model is needed and back."""
    state_dict, info = load_weights(path, kind)
    try:
        model = build_model(state_dict)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    return model.to(device), info


def _kind_message(path: Path, have: str, need: str) -> str:
    """One line saying which model a file is and which one the task needs."""
    use = "`i2v tag`" if need == TAG else "feature extraction"
    return (
        f"{path} is a {have} model ({_HEAD[have]}); {use} needs the {need} model "
        f"({CAFFEMODEL_FILES[need]} or {WEIGHT_FILES[need]})"
    )


# --------------------------------------------------------------------------------------------------------------
# Small helpers


def _sniff(head: bytes) -> str:
    """Tell a file's format from its first bytes (:func:`i2v_cli.sniff.sniff`, the one sniffing helper):
    ``safetensors``, ``torch``, ``caffemodel``, or what else it is, in words."""
    kind = sniff(head)
    if kind in ("safetensors", "caffemodel"):
        return kind
    if kind in ("zip", "pickle"):
        return "torch"  # a zip (torch >= 1.6) or a pickle (older torch.save)
    if kind == "unknown":
        return "caffemodel"  # protobuf has no magic number: the parser decides, and names what it found
    if kind == "empty":
        return "an empty file"
    if kind == "text":
        return "a text file (a .prototxt, or an error page saved instead of the download?)"
    if kind == "gzip":
        return "a gzip file (decompress it first)"
    if kind in IMAGE_KINDS:
        return f"a {describe(kind)} image"
    return f"a {describe(kind)} file"


def _read_head(path: Path) -> bytes:
    """The first bytes of a regular file, with a missing, unreadable or special file as a WeightsError (a pipe
    is refused before it is opened: opening one blocks, and the file is read more than once)."""
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise WeightsError(f"{path} is a folder, not a weight file")
        if not stat.S_ISREG(mode):
            raise WeightsError(f"{path} is not a regular file (a pipe or a device): save the weights to a file first")
        with path.open("rb") as f:
            return f.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path} is a folder, not a weight file") from None
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None


def _read_bytes(path: Path) -> bytes:
    """A whole file, with a missing or unreadable file as a WeightsError."""
    _read_head(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None


def _sha256_file(path: Path) -> str:
    """SHA-256 of a file (hex)."""
    try:
        return sha256_file(path).hex()
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None
