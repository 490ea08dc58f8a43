"""The Python API: load a model once, then the original release's calls with its return shapes.

Old scripts port with one line: ``import i2v_cli as i2v``; ``i2v.make_i2v_with_pytorch(...)`` (or the
original ``make_i2v_with_chainer``) then returns an object with ``estimate_plausible_tags`` and friends.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import CATEGORIES, FEATURE, TAG
from .errors import ModelKindError
from .inference import Predictor, check_precision, predict, prepare_for_inference
from .model import Illust2VecNet
from .runner import resolve_device
from .tags import load_tag_list
from .transform import preprocess
from .weights import WeightsInfo, load_model, resolve_weights

ImageLike = Image.Image | np.ndarray
PathLike = str | os.PathLike[str]
TagScores = list[tuple[str, float]]


class Illustration2Vec:
    """One loaded network (tag or feature model) with the original Illustration2Vec methods."""

    def __init__(
        self,
        model: Illust2VecNet,
        tags: Sequence[str] | None = None,
        info: WeightsInfo | None = None,
        batch_size: int = 16,
        precision: str = "fp32",
        backend: str = "auto",
    ) -> None:
        self.model = model.eval()
        self.precision = precision
        self.backend = backend
        check_precision(precision, self.device)
        self._net: Predictor | None = None  # prepared on first use (packing or exporting takes a moment)
        self.tags = list(tags) if tags is not None else load_tag_list()
        self.index = {t: i for i, t in enumerate(self.tags)}
        self.info = info
        self.batch_size = batch_size

    @property
    def kind(self) -> str:
        """``"tag"`` or ``"feature"``: which network this is."""
        return self.model.arch.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self, images: Iterable[ImageLike], kind: str, method: str) -> np.ndarray:
        if self.kind != kind:
            name = self.info.source if self.info else "this model"
            need = "the tag model (illust2vec_tag_ver200)" if kind == TAG else "the feature model (illust2vec_ver200)"
            raise ModelKindError(f"{method}() needs {need}, but {name} is a {self.kind} model")
        batch = [preprocess(img) for img in images]
        if not batch:
            width = len(self.tags) if kind == TAG else self.model.arch.feature_dim
            return np.zeros((0, width), dtype=np.float32)
        if self._net is None:
            self._net = prepare_for_inference(self.model, precision=self.precision, backend=self.backend)
        return predict(self._net, batch, self.device, self.batch_size)

    def estimate_probabilities(self, images: Iterable[ImageLike]) -> np.ndarray:
        """Sigmoid scores of every tag, float32 (N, 1539) in tag-list order."""
        return self._run(images, TAG, "estimate_probabilities")

    def estimate_specific_tags(self, images: Iterable[ImageLike], tags: Sequence[str]) -> list[dict[str, float]]:
        """For each image, ``{tag: score}`` for the requested tags (unknown tags raise KeyError naming them)."""
        unknown = [t for t in tags if t not in self.index]
        if unknown:
            raise KeyError(f"not in the tag list: {', '.join(map(repr, unknown))}")
        prob = self.estimate_probabilities(images)
        return [{t: float(p[self.index[t]]) for t in tags} for p in prob]

    def estimate_top_tags(self, images: Iterable[ImageLike], n_tag: int = 10) -> list[dict[str, TagScores]]:
        """For each image, the ``n_tag`` best (tag, score) pairs of general, character and copyright, and all
        three ratings, each list highest first."""
        return [self._top(p, n_tag) for p in self.estimate_probabilities(images)]

    def _top(self, prob: np.ndarray, n_tag: int) -> dict[str, TagScores]:
        result: dict[str, TagScores] = {}
        for cat in CATEGORIES:
            block = prob[cat.start : cat.stop]
            order = np.argsort(-block, kind="stable")
            if cat.name != "rating":
                order = order[:n_tag]
            result[cat.name] = [(self.tags[cat.start + i], float(block[i])) for i in order]
        return result

    def estimate_plausible_tags(
        self, images: Iterable[ImageLike], threshold: float = 0.25, threshold_rule: str = "constant"
    ) -> list[dict[str, TagScores]]:
        """For each image, the tags scoring above ``threshold`` per category (highest first); rating holds all
        three ratings as a list, as the original's ``rating`` should have."""
        if threshold_rule != "constant":
            raise ValueError("only threshold_rule='constant' is supported (the release ships no per-tag thresholds)")
        result = []
        for prob in self.estimate_probabilities(images):
            top = self._top(prob, len(prob))
            for name in ("general", "character", "copyright"):
                top[name] = [(t, p) for t, p in top[name] if p > threshold]
            result.append(top)
        return result

    def extract_feature(self, images: Iterable[ImageLike]) -> np.ndarray:
        """The semantic feature (``encode1``, before its sigmoid), float32 (N, 4096)."""
        return self._run(images, FEATURE, "extract_feature")

    def extract_binary_feature(self, images: Iterable[ImageLike]) -> np.ndarray:
        """The binary feature: ``packbits(sigmoid(encode1) > 0.5)``, uint8 (N, 512)."""
        feature = self._run(images, FEATURE, "extract_binary_feature")
        # sigmoid(x) > 0.5 exactly when x > 0.
        return np.packbits(feature > 0, axis=1)


def load(
    weights: PathLike | None = None,
    kind: str | None = None,
    *,
    tag_list: PathLike | None = None,
    device: str = "auto",
    batch_size: int = 16,
    precision: str = "fp32",
    backend: str = "auto",
) -> Illustration2Vec:
    """Load a model from ``weights`` (safetensors, caffemodel or .pth), or from the default places
    (``$I2V_WEIGHTS``, then the cache that ``i2v weights download`` fills) when None.

    ``precision`` (fp32, bf16, fp16) and ``backend`` (auto, torch, onnxruntime) as ``i2v tag``'s options."""
    path = resolve_weights(None if weights is None else os.fspath(weights), kind or TAG)
    model, info = load_model(path, kind=kind, device=str(resolve_device(device)))
    tags = load_tag_list(tag_list)
    return Illustration2Vec(model, tags, info, batch_size, precision, backend)


def make_i2v_with_pytorch(
    param_path: PathLike | None = None,
    tag_path: PathLike | None = None,
    threshold_path: PathLike | None = None,
    *,
    model_path: Any = None,
    device: str = "auto",
) -> Illustration2Vec:
    """The earlier port's (and, as ``make_i2v_with_chainer``, the original's) constructor: a weight file
    and a tag list path. ``model_path`` (a model definition script) is accepted and not needed."""
    del model_path, threshold_path  # the architecture is built in; the release has no threshold file
    return load(param_path, tag_list=tag_path, device=device)


make_i2v_with_chainer = make_i2v_with_pytorch
