"""The Illustration2Vec networks: a conv-only VGG11 tagger and its feature-extracting sibling.

Architecture only, plus the renaming of foreign checkpoints' keys into this module's own (as in timm's
``models/vgg.py``). Reading files is the job of :mod:`i2v_cli.weights`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import CONV_LAYERS, CONV_NAMES, FEATURE, FINAL_MAP_SIZE, NUM_TAGS, TAG
from .errors import WeightsError


@dataclass(frozen=True)
class Architecture:
    """What varies between Illustration2Vec models: the kind, the conv widths, the feature length."""

    kind: str  # TAG or FEATURE
    widths: tuple[int, ...]  # output channels of conv1_1 ... conv6_3
    feature_dim: int = 0  # encode1 outputs (feature models only)
    num_tags: int = NUM_TAGS

    def __post_init__(self) -> None:
        if self.kind not in (TAG, FEATURE):
            raise ValueError(f"unknown model kind {self.kind!r}")
        if len(self.widths) != len(CONV_NAMES):
            raise ValueError(f"expected {len(CONV_NAMES)} widths, got {len(self.widths)}")


class Illust2VecNet(nn.Module):
    """VGG11-style trunk (conv1_1 ... conv6_3) with a tag head (conv6_4 + global average) or a feature head.

    ``forward_features`` gives conv6_3's map; ``forward_head`` turns it into tag logits (tag model) or the
    ``encode1`` feature (feature model); ``forward`` gives tag probabilities or ``encode1``.
    """

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch, widths, pool = 3, iter(arch.widths), 0
        for name in CONV_LAYERS:
            if name is None:
                pool += 1
                layers[f"pool{pool}"] = nn.MaxPool2d(kernel_size=2, stride=2)
                continue
            out_ch = next(widths)
            layers[name] = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
            layers["relu" + name[4:]] = nn.ReLU(inplace=True)
            in_ch = out_ch
        self.features = nn.Sequential(layers)
        if arch.kind == TAG:
            self.conv6_4 = nn.Conv2d(in_ch, arch.num_tags, kernel_size=3, padding=1)
        else:
            self.encode1 = nn.Linear(in_ch * FINAL_MAP_SIZE * FINAL_MAP_SIZE, arch.feature_dim)
            self.encode2 = nn.Linear(arch.feature_dim, arch.num_tags)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """conv6_3's ReLU output, (N, C, FINAL_MAP_SIZE, FINAL_MAP_SIZE) for an INPUT_SIZE x INPUT_SIZE input."""
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tag logits (N, 1539) for a tag model, ``encode1`` (N, feature_dim) for a feature model."""
        if self.arch.kind == TAG:
            return self.conv6_4(x).mean(dim=(2, 3))
        # Caffe's InnerProduct flattens C x H x W in that order, as torch.flatten does on NCHW.
        return self.encode1(torch.flatten(x.contiguous(), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tag probabilities (tag model) or the ``encode1`` semantic feature (feature model)."""
        out = self.forward_head(self.forward_features(x))
        return torch.sigmoid(out) if self.arch.kind == TAG else out


def layer_key(layer: str, param: str) -> str:
    """This module's state-dict key for a Caffe layer name (``conv3_2``, ``encode1``) and ``weight``/``bias``."""
    if layer in CONV_NAMES:
        return f"features.{layer}.{param}"
    return f"{layer}.{param}"


def infer_architecture(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """Work out kind, widths and feature length from a state dict in this module's naming, refusing what no
    Illustration2Vec network has: a layer with no outputs, or a tag head without one output per tag."""
    widths = []
    for name in CONV_NAMES:
        w = state_dict.get(layer_key(name, "weight"))
        if w is None:
            raise WeightsError(f"layer {name} is missing")
        if w.dim() == 0 or w.shape[0] == 0:
            raise WeightsError(f"layer {name} has no output channels (a zero-width model computes nothing)")
        widths.append(int(w.shape[0]))
    has_tag = layer_key("conv6_4", "weight") in state_dict
    has_feature = layer_key("encode1", "weight") in state_dict
    if has_tag and has_feature:
        raise WeightsError("holds both conv6_4 (tag head) and encode1 (feature head): not a known model")
    if not (has_tag or has_feature):
        raise WeightsError("layer conv6_4 (tag model) or encode1 (feature model) is missing")
    if has_tag:
        return Architecture(TAG, tuple(widths), 0, _tag_outputs(state_dict, "conv6_4"))
    encode1 = state_dict[layer_key("encode1", "weight")]
    if encode1.dim() == 0 or encode1.shape[0] == 0:
        raise WeightsError("layer encode1 has no outputs (a zero-length feature)")
    has_encode2 = layer_key("encode2", "weight") in state_dict
    num_tags = _tag_outputs(state_dict, "encode2") if has_encode2 else NUM_TAGS
    return Architecture(FEATURE, tuple(widths), int(encode1.shape[0]), num_tags)


def _tag_outputs(state_dict: Mapping[str, torch.Tensor], layer: str) -> int:
    """The outputs of a tag head (conv6_4, or the feature model's encode2), which must be one per tag."""
    weight = state_dict[layer_key(layer, "weight")]
    outputs = int(weight.shape[0]) if weight.dim() else 0
    if outputs != NUM_TAGS:
        raise WeightsError(
            f"layer {layer} has {outputs} outputs; Illustration2Vec predicts {NUM_TAGS} tags (one per entry of "
            "tag_list.json), so the scores could not be named"
        )
    return outputs


def check_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Architecture:
    """The architecture ``state_dict`` describes, after checking every key and shape against it (``encode2``,
    the feature model's unused tag head, may be absent)."""
    arch = infer_architecture(state_dict)
    with torch.device("meta"):  # shapes only: no memory for a 1 GB model
        expected = {k: tuple(v.shape) for k, v in Illust2VecNet(arch).state_dict().items()}
    if arch.kind == FEATURE and layer_key("encode2", "weight") not in state_dict:
        expected = {k: v for k, v in expected.items() if not k.startswith("encode2.")}
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise WeightsError(f"{', '.join(missing)} missing")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise WeightsError(f"unexpected {', '.join(unexpected)} in a {arch.kind} model")
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != shape:
            raise WeightsError(f"{key} has shape {got}, expected {shape}")
    return arch


def build_model(state_dict: Mapping[str, torch.Tensor]) -> Illust2VecNet:
    """Build the network that ``state_dict`` describes around its tensors (no copy: a 1 GB model costs 1 GB),
    with a clear error on any mismatch."""
    arch = check_state_dict(state_dict)
    with torch.device("meta"):
        model = Illust2VecNet(arch)
    tensors = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in state_dict.items()}
    if arch.kind == FEATURE and layer_key("encode2", "weight") not in tensors:
        # encode2 (feature -> tags) is not needed to extract features: zeros keep the module complete.
        tensors.update({k: torch.zeros(v.shape) for k, v in model.state_dict().items() if k.startswith("encode2.")})
    model.load_state_dict(tensors, assign=True)
    return model.eval()


_INDEXED = re.compile(r"^(?:module\.)?(net|features)\.(\d+)\.(weight|bias)$")
_NAMED = re.compile(r"^(?:\w+\.)*?(conv\d_\d|encode[12])(?:\.0)?\.(weight|bias)$")


def remap_legacy_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename earlier PyTorch ports' keys into this module's naming, so their ``.pth`` files load.

    Known layouts: numbered ``nn.Sequential`` (``net.N.*`` of TagI2V, ``features.N.*`` + ``encode1.0.*`` of
    FeatureI2V; numbered convolutions are assigned to conv1_1 ... in order), and Caffe layer names with or
    without a module prefix (``conv1_1.*`` ... ``conv6_4.*``; ``block.conv1_1.*``, ``tag_classifier.conv6_4.*``,
    ``encode1.*``). A ``module.`` prefix (DataParallel) is ignored.
    """
    convs: dict[int, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    named_convs = False
    sequentials: set[str] = set()
    for key, value in state_dict.items():
        m = _INDEXED.match(key)
        if m:
            sequentials.add(m.group(1))
            if len(sequentials) > 1:
                raise WeightsError("mixes net.N and features.N layers: not a known Illustration2Vec layout")
            params = convs.setdefault(int(m.group(2)), {})
            if m.group(3) in params:  # "module.net.0.weight" beside "net.0.weight", or "net.00.weight"
                raise WeightsError(f"holds {m.group(1)}.{int(m.group(2))}.{m.group(3)} twice (key {key!r})")
            params[m.group(3)] = value
            continue
        m = _NAMED.match(key)
        if m and (m.group(1) in CONV_NAMES or m.group(1) in ("conv6_4", "encode1", "encode2")):
            layer, param = m.group(1), m.group(2)
            if layer.startswith("encode"):
                if value.dim() == 0:
                    raise WeightsError(f"{key} is a scalar, not a {param} tensor")
                value = value.reshape(value.shape[0], -1) if param == "weight" else value.reshape(-1)
            else:
                named_convs = True
            new_key = layer_key(layer, param)
            if new_key in out:
                raise WeightsError(f"holds {layer}.{param} twice (key {key!r})")
            out[new_key] = value
            continue
        raise WeightsError(f"unexpected key {key!r} for an Illustration2Vec state dict")
    if not convs:
        return out
    if named_convs:
        raise WeightsError("mixes numbered and named convolution layers: not a known Illustration2Vec layout")
    names: Sequence[str] = CONV_NAMES + (("conv6_4",) if not out else ())
    ordered = [convs[i] for i in sorted(convs)]
    if len(ordered) != len(names):
        raise WeightsError(f"holds {len(ordered)} convolution layers, expected {len(names)}")
    for name, params in zip(names, ordered, strict=True):
        for param, value in params.items():
            out[layer_key(name, param)] = value
    return out
