"""The tag list and the turning of one image's 1,539 scores into per-category tag selections."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .config import CATEGORIES, NUM_TAGS
from .errors import TagListError

#: Categories whose tags are kept only when their score passes a threshold; rating is always given whole.
THRESHOLDED = ("general", "character", "copyright")
DEFAULT_THRESHOLD = 0.5


def load_tag_list(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Read a tag list (the packaged release list when ``path`` is None) and check it is 1,539 strings."""
    try:
        if path is None:
            text = resources.files("i2v_cli").joinpath("tag_list.json").read_text(encoding="utf-8")
            where = "the packaged tag_list.json"
        else:
            text = Path(path).read_text(encoding="utf-8")
            where = os.fspath(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise TagListError(f"cannot read tag list {path}: {exc}") from None
    try:
        tags = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TagListError(f"{where} is not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TagListError(f"{where} must be a JSON list of strings")
    if len(tags) != NUM_TAGS:
        raise TagListError(f"{where} holds {len(tags)} tags; Illustration2Vec's list has {NUM_TAGS}")
    return tags


@dataclass(frozen=True)
class Selection:
    """How to pick tags from scores: a threshold per thresholded category, and an optional per-category cap."""

    thresholds: Mapping[str, float]
    top_k: int | None = None

    @classmethod
    def make(
        cls,
        threshold: float | None = None,
        *,
        general: float | None = None,
        character: float | None = None,
        copyright: float | None = None,
        top_k: int | None = None,
    ) -> Selection:
        """Resolve the CLI's options: a per-category value wins over ``threshold``, which defaults to 0.5
        (or to 0 when only ``top_k`` is asked for, so that ``--top-k 5`` gives five tags)."""
        base = threshold if threshold is not None else (DEFAULT_THRESHOLD if top_k is None else 0.0)
        given = {"general": general, "character": character, "copyright": copyright}
        return cls({c: base if v is None else v for c, v in given.items()}, top_k)


def select_tags(scores: np.ndarray, tags: Sequence[str], selection: Selection) -> dict[str, dict[str, float]]:
    """Per category, the tags whose score is at least its threshold, highest first (capped at ``top_k``);
    rating always holds all three ratings. Scores are plain Python floats."""
    out: dict[str, dict[str, float]] = {}
    for cat in CATEGORIES:
        block = scores[cat.start : cat.stop]
        order = np.argsort(-block, kind="stable")
        if cat.name in THRESHOLDED:
            order = order[block[order] >= selection.thresholds[cat.name]]
            if selection.top_k is not None:
                order = order[: selection.top_k]
        out[cat.name] = {tags[cat.start + i]: float(block[i]) for i in order}
    return out


def tag_record(
    path: str, scores: np.ndarray | None, error: str | None, tags: Sequence[str], selection: Selection
) -> dict[str, object]:
    """The output record of one image: its path and four categories, or its path and the error."""
    if scores is None:
        return {"path": path, "error": error or "unknown error"}
    return {"path": path, **select_tags(scores, tags, selection)}
