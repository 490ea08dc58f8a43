"""The tag list and the turning of one image's 1,539 scores into per-category tag selections."""

from __future__ import annotations

import difflib
import functools
import json
import numbers
import os
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .config import CATEGORIES, NUM_TAGS
from .errors import ParameterError, TagListError

#: Categories whose tags are kept only when their score passes a threshold; rating is always given whole.
THRESHOLDED = ("general", "character", "copyright")
DEFAULT_THRESHOLD = 0.5


def load_tag_list(path: str | os.PathLike[str] | None = None) -> list[str]:
    """Read a tag list (the packaged release list when ``path`` is None) and check it is 1,539 strings."""
    if path is None:
        return list(_packaged_tag_list())  # read and checked once a process (checking costs about 30 ms)
    return _read_tag_list(path)


@functools.cache
def _packaged_tag_list() -> tuple[str, ...]:
    return tuple(_read_tag_list(None))


def _read_tag_list(path: str | os.PathLike[str] | None) -> list[str]:
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
    check_tag_names(tags, where)
    return tags


#: Unicode categories a tag name may not hold: control characters (newline, NUL, tab, U+0085, ...), lone
#: surrogates, and the line and paragraph separators U+2028/U+2029 (``str.splitlines`` splits on them).
_BAD_CATEGORIES = {"Cc": "a control character", "Cs": "a lone surrogate", "Zl": "a line separator",
                   "Zp": "a paragraph separator"}  # fmt: skip


def _name_problem(name: str) -> str | None:
    if not name.strip():
        return "empty" if not name else "only white space"
    for ch in name:
        what = _BAD_CATEGORIES.get(unicodedata.category(ch))
        if what is not None:
            return f"{what} (U+{ord(ch):04X})"
    if name != name.strip():
        return "white space at its start or end"
    return None


def tag_key(tag: str) -> str:
    """The form in which two spellings of a tag compare equal: underscores as spaces, runs of white space
    as one space, case folded (``Long_Hair`` and ``long hair`` are the same tag)."""
    return " ".join(tag.replace("_", " ").split()).casefold()


def closest_tags(name: str, tags: Sequence[str], n: int = 3) -> list[str]:
    """The tags of ``tags`` most like ``name``: the one spelled the same way (:func:`tag_key`) if there is one,
    else up to ``n`` close matches by :func:`difflib.get_close_matches` on the :func:`tag_key` forms."""
    keys: dict[str, str] = {}
    for tag in tags:
        keys.setdefault(tag_key(tag), tag)
    key = tag_key(name)
    if key in keys:
        return [keys[key]]
    return [keys[k] for k in difflib.get_close_matches(key, list(keys), n=n)]


def check_tag_names(tags: Sequence[str], where: str = "the tag list", shown: int = 3) -> None:
    """Refuse, naming the first ``shown`` offenders, a tag list whose names cannot serve as record keys or be
    read back from a caption: duplicates (scores would go to the wrong tag), empty or white-space names, names
    with white space at either end, control characters (newline, NUL, ...), line separators, lone surrogates."""
    first: dict[str, int] = {}
    problems: list[str] = []
    for i, name in enumerate(tags):
        problem = _name_problem(name)
        if problem is None and name in first:
            problem = f"a duplicate of #{first[name]}"
        first.setdefault(name, i)
        if problem is not None:
            problems.append(f"#{i} {name!r} ({problem})")
    if problems:
        more = f" and {len(problems) - shown} more" if len(problems) > shown else ""
        raise TagListError(
            f"{where}: {len(problems)} unusable tag name(s): {'; '.join(problems[:shown])}{more}. "
            "Every name must be unique, non-empty, printable and without white space at either end"
        )


def check_threshold(value: object, name: str = "threshold") -> float:
    """``value`` as a float when it is a real number in [0, 1]; ParameterError otherwise (NaN included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParameterError(f"{name} must be a number from 0 to 1, got a {type(value).__name__}")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # NaN fails this too
        raise ParameterError(f"{name} must be a number from 0 to 1, got {number!r}")
    return number


def passes(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one threshold rule of the CLI and the API: a tag is kept when its float32 score is at least the
    threshold rounded to float32 (so a score written as ``0.7`` passes ``--threshold 0.7``)."""
    return np.asarray(scores, dtype=np.float32) >= np.float32(threshold)


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
    """Per category, the tags whose score is at least its threshold (:func:`passes`), highest first (capped at
    ``top_k``); rating always holds all three ratings. Scores are plain Python floats of the float32 values."""
    out: dict[str, dict[str, float]] = {}
    for cat in CATEGORIES:
        block = scores[cat.start : cat.stop]
        order = np.argsort(-block, kind="stable")
        if cat.name in THRESHOLDED:
            order = order[passes(block[order], selection.thresholds[cat.name])]
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
