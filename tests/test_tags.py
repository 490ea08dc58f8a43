"""Tag list validation and per-category selection."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from i2v_cli.errors import ParameterError, TagListError
from i2v_cli.tags import (
    Selection,
    check_tag_names,
    check_threshold,
    closest_tags,
    load_tag_list,
    passes,
    select_tags,
    tag_record,
)

TAGS = load_tag_list()


def test_packaged_list_is_the_release_list():
    assert len(TAGS) == 1539
    assert TAGS[:2] == ["1girl", "solo"]
    assert TAGS[512] == "hatsune miku" and TAGS[1024] == "touhou"
    assert TAGS[1536:] == ["safe", "questionable", "explicit"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not JSON"),
        ('{"a": 1}', "must be a JSON list of strings"),
        ("[1, 2]", "must be a JSON list of strings"),
        ('["a", "b"]', "holds 2 tags; Illustration2Vec's list has 1539"),
    ],
)
def test_bad_tag_lists(tmp_path, content, message):
    path = tmp_path / "tags.json"
    path.write_text(content)
    with pytest.raises(TagListError, match=message):
        load_tag_list(path)


def test_missing_tag_list(tmp_path):
    with pytest.raises(TagListError, match="cannot read tag list"):
        load_tag_list(tmp_path / "nope.json")


def test_custom_tag_list_is_used(tmp_path):
    path = tmp_path / "tags.json"
    path.write_text(json.dumps([f"t{i}" for i in range(1539)]))
    assert load_tag_list(path)[5] == "t5"


def test_selection_defaults():
    assert Selection.make().thresholds == {"general": 0.5, "character": 0.5, "copyright": 0.5}
    assert Selection.make(top_k=3).thresholds["general"] == 0.0
    sel = Selection.make(0.3, character=0.9, top_k=2)
    assert sel.thresholds == {"general": 0.3, "character": 0.9, "copyright": 0.3} and sel.top_k == 2


def test_select_tags_exact():
    scores = np.zeros(1539, dtype=np.float32)
    scores[[0, 1, 2]] = [0.9, 0.5, 0.49]
    scores[512] = 0.7
    scores[1536:] = [0.2, 0.7, 0.1]
    out = select_tags(scores, TAGS, Selection.make(0.5))
    assert out == {
        "general": {"1girl": pytest.approx(0.9), "solo": 0.5},
        "character": {"hatsune miku": pytest.approx(0.7)},
        "copyright": {},
        "rating": {
            "questionable": pytest.approx(0.7),
            "safe": pytest.approx(0.2),
            "explicit": pytest.approx(0.1),
        },
    }
    assert list(out["rating"]) == ["questionable", "safe", "explicit"]
    assert all(type(v) is float for cat in out.values() for v in cat.values())


def test_top_k_caps_each_category():
    rng = np.random.default_rng(0)
    out = select_tags(rng.random(1539, dtype=np.float32), TAGS, Selection.make(top_k=4))
    assert [len(out[c]) for c in ("general", "character", "copyright", "rating")] == [4, 4, 4, 3]


def test_threshold_zero_gives_every_score():
    out = select_tags(np.zeros(1539, dtype=np.float32), TAGS, Selection.make(0.0))
    assert sum(len(v) for v in out.values()) == 1539


@settings(max_examples=50, deadline=None)
@given(
    scores=arrays(np.float32, 1539, elements=st.floats(0, 1, width=32)),
    threshold=st.floats(0, 1),
)
def test_selection_is_exactly_the_tags_at_or_above_threshold(scores, threshold):
    out = select_tags(scores, TAGS, Selection.make(threshold))
    for name, start in (("general", 0), ("character", 512), ("copyright", 1024)):
        expected = {TAGS[start + i] for i in range(512) if scores[start + i] >= threshold}
        assert set(out[name]) == expected
        values = list(out[name].values())
        assert values == sorted(values, reverse=True)


def test_error_record():
    assert tag_record("x.png", None, "truncated", TAGS, Selection.make()) == {
        "path": "x.png",
        "error": "truncated",
    }


def test_packaged_tag_list_is_the_top_level_one():
    """The tag list shipped inside the package is the repository's tag_list.json, byte for byte."""
    root = Path(__file__).parent.parent
    assert (root / "i2v_cli" / "tag_list.json").read_bytes() == (root / "tag_list.json").read_bytes()


# --- names that cannot serve as keys or be read back (issue 14 point 13) ------------------------------------


def _write_list(tmp_path, changes):
    names = [f"t{i}" for i in range(1539)]
    for i, name in changes.items():
        names[i] = name
    path = tmp_path / "tags.json"
    path.write_text(json.dumps(names), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({7: "t3"}, "#7 't3' (a duplicate of #3)"),
        ({4: ""}, "#4 '' (empty)"),
        ({4: "   "}, "#4 '   ' (only white space)"),
        ({4: "a\nb"}, "#4 'a\\nb' (a control character (U+000A))"),
        ({4: "a\0b"}, "#4 'a\\x00b' (a control character (U+0000))"),
        ({4: "a\tb"}, "#4 'a\\tb' (a control character (U+0009))"),
        ({4: "a\x85b"}, "#4 'a\\x85b' (a control character (U+0085))"),
        ({4: "a\u2028b"}, "#4 'a\\u2028b' (a line separator (U+2028))"),
        ({4: "a\ud800b"}, "#4 'a\\ud800b' (a lone surrogate (U+D800))"),
        ({4: " solo"}, "#4 ' solo' (white space at its start or end)"),
    ],
)
def test_unusable_tag_names_are_refused(tmp_path, changes, problem):
    path = _write_list(tmp_path, changes)
    with pytest.raises(TagListError) as info:
        load_tag_list(path)
    assert str(info.value) == (
        f"{path}: 1 unusable tag name(s): {problem}. "
        "Every name must be unique, non-empty, printable and without white space at either end"
    )


def test_unusable_names_message_shows_the_first_three(tmp_path):
    path = _write_list(tmp_path, {10: "t0", 11: "t0", 12: "", 13: "t1"})
    with pytest.raises(TagListError, match=r": 4 unusable tag name\(s\): #10 't0' \(a duplicate of #0\); "
                       r"#11 't0' \(a duplicate of #0\); #12 '' \(empty\) and 1 more\. "):  # fmt: skip
        load_tag_list(path)


def test_names_differing_only_in_spelling_are_distinct_tags(tmp_path):
    assert load_tag_list(_write_list(tmp_path, {0: "long hair", 1: "long_hair", 2: "Long Hair"}))[:3] == [
        "long hair",
        "long_hair",
        "Long Hair",
    ]


@settings(max_examples=50, deadline=None)
@given(names=st.lists(st.text(max_size=6), min_size=1, max_size=30))
def test_check_tag_names_accepts_exactly_usable_lists(names):
    usable = len(set(names)) == len(names) and all(
        n.strip() == n and n and all(unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") for c in n) for n in names
    )
    if usable:
        check_tag_names(names)
    else:
        with pytest.raises(TagListError):
            check_tag_names(names)


# --- the one threshold rule (issue 12 point 8) ---------------------------------------------------------------


def test_threshold_rule_is_float32_at_least():
    scores = np.array([0.7, 0.69999999, 0.5, 0.25], dtype=np.float32)
    assert passes(scores, 0.7).tolist() == [True, True, False, False]  # 0.69999999 is float32(0.7)
    assert passes(scores, float(np.float32(0.5))).tolist() == [True, True, True, False]
    assert passes(scores, float(np.nextafter(np.float32(0.5), np.float32(1)))).tolist() == [True, True, False, False]
    assert passes(scores.astype(np.float64), 0.7).tolist() == [True, True, False, False]


def test_select_tags_uses_the_rule_at_the_exact_score():
    scores = np.zeros(1539, dtype=np.float32)
    scores[0] = np.float32(0.7)
    out = select_tags(scores, TAGS, Selection.make(0.7))
    assert out["general"] == {"1girl": float(np.float32(0.7))}


@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan"), float("-inf"), True, "0.5", None])
def test_check_threshold_refuses(value):
    with pytest.raises(ParameterError, match="threshold must be a number from 0 to 1") as info:
        check_threshold(value)
    assert isinstance(info.value, ValueError)


def test_check_threshold_accepts():
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0
    assert check_threshold(np.float32(0.25)) == 0.25


def test_closest_tags():
    assert closest_tags("Long_Hair", TAGS) == ["long hair"]
    assert closest_tags("long hiar", TAGS)[0] == "long hair"
    assert closest_tags("zzzzqqq", TAGS) == []


def test_the_packaged_list_is_read_and_checked_once(monkeypatch):
    # Checking the 1,539 names costs about 30 ms; the index called it for every image it stored (top_rating).
    from i2v_cli import tags

    calls = []
    real = tags.check_tag_names
    monkeypatch.setattr(tags, "check_tag_names", lambda *a, **k: calls.append(1) or real(*a, **k))
    tags._packaged_tag_list.cache_clear()
    first = tags.load_tag_list()
    first.append("mutated by a caller")
    second = tags.load_tag_list()
    assert len(calls) == 1 and len(second) == 1539 and second[-1] != "mutated by a caller"
    tags._packaged_tag_list.cache_clear()
