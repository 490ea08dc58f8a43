"""Tag list validation and per-category selection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from i2v_cli.errors import TagListError
from i2v_cli.tags import Selection, load_tag_list, select_tags, tag_record

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
