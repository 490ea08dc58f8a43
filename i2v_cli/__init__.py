"""i2v: tag anime-style illustrations and turn them into semantic vectors (Illustration2Vec in PyTorch).

Old scripts port with one line, ``import i2v_cli as i2v``::

    illust2vec = i2v.make_i2v_with_pytorch(param_path="illust2vec_tag_ver200.caffemodel", tag_path="tag_list.json")
    illust2vec.estimate_plausible_tags([img], threshold=0.5)

The API is imported on first use, so that ``i2v --help`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = ("Illustration2Vec", "load", "make_i2v_with_chainer", "make_i2v_with_pytorch")
_ERRORS = (
    "CaptionError",
    "DownloadError",
    "I2VError",
    "ImageArrayError",
    "ImageDecodeError",
    "ImageInputError",
    "InputError",
    "ModelKindError",
    "OutputError",
    "ParameterError",
    "TagListError",
    "UnknownTagError",
    "WeightsError",
    "WeightsNotFoundError",
)

__all__ = sorted([*_API, *_ERRORS, "__version__"])


def __getattr__(name: str) -> Any:
    if name == "__version__":  # read from the installed metadata when asked (importlib.metadata is slow to load)
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("i2v")
        except PackageNotFoundError:  # a source tree that was not installed
            return "0+unknown"
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name in _ERRORS:
        return getattr(importlib.import_module(".errors", __name__), name)
    raise AttributeError(f"module 'i2v_cli' has no attribute {name!r}")
