"""The Python API: load a model once, then the original release's calls with its return shapes.

Old scripts port with one line: ``import i2v_cli as i2v``; ``i2v.make_i2v_with_pytorch(...)`` (or the
original ``make_i2v_with_chainer``) then returns an object with ``estimate_plausible_tags`` and friends.
"""

from __future__ import annotations

import io
import operator
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import CATEGORIES, FEATURE, NUM_TAGS, TAG
from .errors import (
    I2VError,
    ImageDecodeError,
    ImageInputError,
    ModelKindError,
    ParameterError,
    TagListError,
    UnknownTagError,
)
from .inference import Predictor, check_precision, predict, prepare_for_inference, resolve_backend
from .model import Illust2VecNet
from .runner import resolve_device
from .tags import Selection, check_tag_names, check_threshold, closest_tags, load_tag_list, select_tags
from .transform import load_and_preprocess, preprocess
from .weights import WeightsInfo, load_model, resolve_weights
from .writers import display

ImageLike = Image.Image | np.ndarray | torch.Tensor
#: A path to an image file, decoded as ``i2v tag`` decodes it (EXIF orientation applied).
ImagePath = str | bytes | os.PathLike[str] | os.PathLike[bytes]
#: What every method takes: one image or path, or a list (any iterable, generators included) of them, or an
#: (N, H, W, C) array of N images.
Images = ImageLike | ImagePath | Iterable[ImageLike | ImagePath]
PathLike = str | os.PathLike[str]
TagScores = list[tuple[str, float]]

_PATH_TYPES = (str, bytes, os.PathLike)
_ARRAY_TYPES = (np.ndarray, torch.Tensor)
_WHAT_TO_PASS = "pass a PIL image, an (H, W[, C]) array, a file path, or a list of them (or an (N, H, W, C) array)"


def _is_open_file(obj: object) -> bool:
    """Whether ``obj`` is an open file: an ``io`` stream, or anything with ``read`` that is not an image (the
    wrapper of ``tempfile.NamedTemporaryFile`` is no ``io.IOBase``)."""
    return isinstance(obj, io.IOBase) or (
        callable(getattr(obj, "read", None)) and not isinstance(obj, (Image.Image, *_PATH_TYPES, *_ARRAY_TYPES))
    )


def _is_single(images: object) -> bool:
    """Whether ``images`` is one image rather than a collection of them (see :data:`Images`). An open file is one
    (refused by :func:`_check_item`): iterated, it gave its bytes' lines, each taken as a path."""
    if isinstance(images, (Image.Image, *_PATH_TYPES)) or _is_open_file(images):
        return True
    if isinstance(images, _ARRAY_TYPES):
        if images.ndim == 2:
            return True
        if images.ndim == 3:
            if images.shape[2] in (1, 3, 4):
                return True
            raise ImageInputError(
                f"a 3-D array is one (H, W, C) image with 1, 3 or 4 channels, last, not shape {tuple(images.shape)}: "
                "to give several images, pass a list of them or an (N, H, W, C) array"
            )
        if images.ndim == 4:
            return False
        raise ImageInputError(
            f"an array of {images.ndim} dimensions (shape {tuple(images.shape)}) is not an image: {_WHAT_TO_PASS}"
        )
    return False


def _items(images: Images) -> Iterable[Any]:
    """The images one by one: a single image as a list of one; a list (or generator) as it is, consumed lazily."""
    if _is_single(images):
        return [images]
    if isinstance(images, (bytearray, memoryview)) or not isinstance(images, Iterable):
        raise ImageInputError(f"got a {type(images).__name__}: {_WHAT_TO_PASS}")
    if isinstance(images, Sequence):
        for index, item in enumerate(images):  # a type mistake is found before any image is computed
            _check_item(item, index)
    return images


def _check_item(item: object, index: int | None) -> None:
    where = "the image" if index is None else f"image at index {index}"
    if isinstance(item, _ARRAY_TYPES):
        if item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (1, 3, 4)):
            return
        raise ImageInputError(
            f"{where} is an array of shape {tuple(item.shape)}: an image is (H, W), or (H, W, C) with 1, 3 or 4 "
            "channels",
            index=index,
        )
    if _is_open_file(item):
        raise ImageInputError(
            f"{where} is an open file ({type(item).__name__}): pass its path, or PIL.Image.open(file)", index=index
        )
    if not isinstance(item, (Image.Image, *_PATH_TYPES)):
        raise ImageInputError(f"{where} is a {type(item).__name__}: {_WHAT_TO_PASS}", index=index)


def network_input(item: ImageLike | ImagePath, index: int | None = None) -> torch.Tensor:
    """One image's (3, 224, 224) network input: a path decoded as ``i2v tag`` decodes it, a PIL image or an
    array preprocessed. Raises ImageInputError saying which image (``index`` in its list) and why."""
    _check_item(item, index)
    where = "" if index is None else f"image at index {index}: "
    if isinstance(item, _PATH_TYPES):
        path = os.fsdecode(os.fspath(item))
        try:
            return load_and_preprocess(item)
        except ImageDecodeError as exc:  # the message readable anywhere (\xNN for a name's non-UTF-8 bytes)
            raise ImageInputError(display(f"{where}{exc}"), index=index, path=path) from exc
    try:
        return preprocess(item)
    except (ValueError, TypeError, OSError, ImageDecodeError) as exc:  # a bad shape or dtype, a truncated file
        kind = type(item).__name__ if not isinstance(item, Image.Image) else "PIL image"
        raise ImageInputError(f"{where or 'the image: '}cannot use this {kind}: {exc}", index=index) from exc


#: Sessions a forked child inherited and replaced by its own: never destroyed, as a destructor would wait for
#: their threads, which were not forked.
_INHERITED: list[Predictor] = []


class Illustration2Vec:
    """One loaded network (tag or feature model) with the original Illustration2Vec methods.

    Every method takes one image or many (see :data:`Images`): a PIL image, an (H, W[, C]) array, a path (str,
    bytes or ``os.PathLike``: decoded as ``i2v tag`` decodes files, so the scores are the CLI's), a list or any
    iterable of them (generators are read lazily), or an (N, H, W, C) array. The return shapes are the original
    release's, per image: one image counts as a list of one, so it gives a list of one result (or one row).
    Images are read and preprocessed ``batch_size`` at a time, so memory stays that of one batch however many
    there are. A bad image raises ImageInputError naming its index in the list (and its path).

    Arrays hold RGB (or grey, or RGBA: alpha dropped) pixel values on a 0-255 scale whatever their dtype, as the
    original took them: scale a float image in [0, 1] by 255, and a 16-bit one down by 257, before passing it.
    PIL images and files are converted by their mode (16-bit grey keeps its top 8 bits, float grey in [0, 1]
    is scaled), as ``i2v tag`` reads them.
    """

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
        self.batch_size = batch_size
        _check_engine(precision, backend, self.device)
        self.precision = precision
        self.backend = backend
        self._net: Predictor | None = None  # prepared on first use (packing or exporting takes a moment)
        self._pid = os.getpid()  # the process _net was prepared in (see _predict)
        self.tags = list(tags) if tags is not None else load_tag_list()
        if len(self.tags) != NUM_TAGS:
            raise TagListError(f"the tag list holds {len(self.tags)} tags; Illustration2Vec's list has {NUM_TAGS}")
        check_tag_names(self.tags)
        self.index = {t: i for i, t in enumerate(self.tags)}
        self.info = info

    @property
    def batch_size(self) -> int:
        """Images read, preprocessed and run through the network at a time (at least 1)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._batch_size = _positive_int(value, "batch_size")

    @property
    def kind(self) -> str:
        """``"tag"`` or ``"feature"``: which network this is."""
        return self.model.arch.kind

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, images: Images, kind: str, method: str) -> Iterator[np.ndarray]:
        """The network's float32 outputs, a batch at a time: at most ``batch_size`` images are held
        preprocessed at once, and the images are read only as the batches need them."""
        if self.kind != kind:
            name = self.info.source if self.info else "this model"
            need = "the tag model (illust2vec_tag_ver200)" if kind == TAG else "the feature model (illust2vec_ver200)"
            raise ModelKindError(f"{method}() needs {need}, but {name} is a {self.kind} model")
        single = _is_single(images)
        batch: list[torch.Tensor] = []
        for index, item in enumerate(_items(images)):
            batch.append(network_input(item, None if single else index))
            if len(batch) >= self.batch_size:
                yield self._predict(batch)
                batch = []
        if batch:
            yield self._predict(batch)

    def _predict(self, batch: list[torch.Tensor]) -> np.ndarray:
        if self._pid != os.getpid():
            self._forked()
        if self._net is None:
            self._net = prepare_for_inference(self.model, precision=self.precision, backend=self.backend)
        return predict(self._net, batch, self.device, self.batch_size)

    def _forked(self) -> None:
        """First use in a child forked from the process that ran the network (``multiprocessing``'s fork): the
        threads of OpenMP and of an ONNX Runtime session did not come along, and the next parallel call waited for
        them forever. The child runs on one thread, as PyTorch's DataLoader workers do, and opens its own session."""
        torch.set_num_threads(1)
        if self._net is not None and not isinstance(self._net, torch.nn.Module):
            _INHERITED.append(self._net)
            self._net = None
        self._pid = os.getpid()

    def _run(self, images: Images, kind: str, method: str) -> np.ndarray:
        outs = list(self._batches(images, kind, method))
        if outs:
            return np.concatenate(outs)
        width = len(self.tags) if kind == TAG else self.model.arch.feature_dim
        return np.zeros((0, width), dtype=np.float32)

    def _per_image(self, images: Images, method: str) -> Iterator[np.ndarray]:
        for out in self._batches(images, TAG, method):
            yield from out

    def estimate_probabilities(self, images: Images) -> np.ndarray:
        """Sigmoid scores of every tag, float32 (N, 1539) in tag-list order."""
        return self._run(images, TAG, "estimate_probabilities")

    def estimate_specific_tags(self, images: Images, tags: str | Iterable[str]) -> list[dict[str, float]]:
        """For each image, ``{tag: score}`` for the requested tags: a name or an iterable of names (unknown
        names raise UnknownTagError, a KeyError, naming them and the closest known names)."""
        names = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, Iterable) else None
        if names is None or not all(isinstance(t, str) for t in names):
            raise ParameterError(f"tags must be a tag name or a list of names, got {tags!r}")
        unknown = [t for t in names if t not in self.index]
        if unknown:
            raise UnknownTagError(f"not in the tag list: {self._unknown(unknown)}")
        return [{t: float(p[self.index[t]]) for t in names} for p in self._per_image(images, "estimate_specific_tags")]

    def _unknown(self, names: list[str]) -> str:
        shown = []
        for name in names:
            close = closest_tags(name, self.tags)
            shown.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)" if close else ""))
        return ", ".join(shown)

    def estimate_top_tags(self, images: Images, n_tag: int = 10) -> list[dict[str, TagScores]]:
        """For each image, the ``n_tag`` best (tag, score) pairs of general, character and copyright, and all
        three ratings, each list highest first."""
        n_tag = _positive_int(n_tag, "n_tag", minimum=0)
        return [self._top(p, n_tag) for p in self._per_image(images, "estimate_top_tags")]

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
        self, images: Images, threshold: float = 0.25, threshold_rule: str = "constant"
    ) -> list[dict[str, TagScores]]:
        """For each image, the tags whose score is at least ``threshold`` per category (highest first); rating
        holds all three ratings as a list, as the original's ``rating`` should have.

        The rule is ``i2v tag``'s (:func:`i2v_cli.tags.passes`): the float32 score ``>=`` the threshold in
        float32. The original release kept a score ``>`` the threshold: the two differ only for a score
        exactly equal to the threshold. ``threshold`` must be in [0, 1]."""
        if threshold_rule != "constant":
            raise ParameterError(
                "only threshold_rule='constant' is supported (the release ships no per-tag thresholds)"
            )
        selection = Selection.make(check_threshold(threshold))
        return [
            {cat: list(chosen.items()) for cat, chosen in select_tags(p, self.tags, selection).items()}
            for p in self._per_image(images, "estimate_plausible_tags")
        ]

    def extract_feature(self, images: Images) -> np.ndarray:
        """The semantic feature (``encode1``, before its sigmoid), float32 (N, 4096)."""
        return self._run(images, FEATURE, "extract_feature")

    def extract_binary_feature(self, images: Images) -> np.ndarray:
        """The binary feature: ``packbits(sigmoid(encode1) > 0.5)``, uint8 (N, 512)."""
        feature = self._run(images, FEATURE, "extract_binary_feature")
        # sigmoid(x) > 0.5 exactly when x > 0.
        return np.packbits(feature > 0, axis=1)


def _check_engine(precision: str, backend: str, device: torch.device) -> None:
    """Refuse, as ParameterError, a precision or backend that cannot run on ``device`` (checked when the model
    is loaded, not at its first use)."""
    try:
        check_precision(precision, device)
        resolve_backend(backend, device, precision)
    except I2VError as exc:
        raise ParameterError(str(exc)) from None


def _positive_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` as an int when it is an integer (not a bool) of at least ``minimum``; ParameterError otherwise."""
    try:
        number = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        number = None
    if number is None or isinstance(value, bool):
        raise ParameterError(f"{name} must be an integer, got a {type(value).__name__}")
    if number < minimum:
        raise ParameterError(f"{name} must be at least {minimum}, got {number}")
    return number


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

    ``precision`` (fp32, bf16, fp16) and ``backend`` (auto, torch, onnxruntime) as ``i2v tag``'s options. Every
    option is checked before the weights are read: a mistake raises ParameterError (a ValueError)."""
    if kind not in (None, TAG, FEATURE):
        raise ParameterError(f"kind must be {TAG!r}, {FEATURE!r} or None (either, from the file), got {kind!r}")
    _positive_int(batch_size, "batch_size")
    try:
        dev = resolve_device(device)
    except I2VError as exc:
        raise ParameterError(str(exc)) from None
    _check_engine(precision, backend, dev)
    tags = load_tag_list(tag_list)
    path = resolve_weights(None if weights is None else os.fspath(weights), kind or TAG)
    model, info = load_model(path, kind=kind, device=str(dev))
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
