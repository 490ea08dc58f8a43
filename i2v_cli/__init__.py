"""i2v: tag anime-style illustrations and turn them into semantic vectors (Illustration2Vec in PyTorch).

Old scripts port with one line, ``import i2v_cli as i2v``::

    illust2vec = i2v.make_i2v_with_pytorch(param_path="illust2vec_tag_ver200.caffemodel", tag_path="tag_list.json")
    illust2vec.estimate_plausible_tags([img], threshold=0.5)
"""

from __future__ import annotations

from .api import Illustration2Vec, load, make_i2v_with_chainer, make_i2v_with_pytorch
from .errors import (
    CaptionError,
    DownloadError,
    I2VError,
    ImageDecodeError,
    ImageInputError,
    InputError,
    ModelKindError,
    ParameterError,
    TagListError,
    UnknownTagError,
    WeightsError,
    WeightsNotFoundError,
)

__all__ = [
    "CaptionError",
    "DownloadError",
    "I2VError",
    "Illustration2Vec",
    "ImageDecodeError",
    "ImageInputError",
    "InputError",
    "ModelKindError",
    "ParameterError",
    "TagListError",
    "UnknownTagError",
    "WeightsError",
    "WeightsNotFoundError",
    "load",
    "make_i2v_with_chainer",
    "make_i2v_with_pytorch",
]
