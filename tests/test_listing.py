"""``i2v search`` without ``--like``: each of the three listing plans (a walk of the path index that tests each row
on its own scores, a walk against a bitmap of the matches, SQLite's sort of the matches) gives exactly the matches
a plain evaluation of the terms gives, in path order, for any query and any K."""

from __future__ import annotations

import operator
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from i2v_cli import query
from i2v_cli.config import NUM_TAGS
from i2v_cli.index import FileState, Index, fs_path
from i2v_cli.query import RATINGS, RatingTerm, parse, search

ROWS = 300
BOUNDS = [0.0, 0.01, 0.05, 0.3, 0.5, 0.7, 1.0]
OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """An index whose path order is not its id order, with errors, deleted rows and a non-UTF-8 name."""
    rng = np.random.default_rng(11)
    path = str(tmp_path_factory.mktemp("listing") / "c.db")
    idx = Index(path, create=True)
    idx.check_models({"source": "t", "sha256": "0"}, {"source": "t", "sha256": "0"}, 8)
    names = [f"/c/{n:05d}.png" for n in rng.permutation(10 * ROWS)[:ROWS]]
    names[5] = os.fsdecode(b"/c/\xff\xfe-latin1.png")
    expected: dict[int, tuple[bytes, np.ndarray]] = {}
    with idx.transaction():
        for i, name in enumerate(names):
            state = FileState(name, 100 + i, i, i.to_bytes(32, "big"), 64, 48, "PNG")
            if i % 17 == 3:
                idx.put(state, None, None, "broken image")
                continue
            scores = np.zeros(NUM_TAGS, np.float32)
            scores[0] = rng.uniform(0, 1)  # broad: about half above 0.5
            scores[1] = rng.uniform(0, 1) ** 4  # about one in six above 0.5
            scores[2] = rng.uniform(0, 0.1)  # below the index's floor for most rows
            scores[-3:] = rng.dirichlet([3, 1, 1])
            idx.put(state, scores, rng.standard_normal(8).astype(np.float32), None)
            expected[idx.row_id(name)] = (fs_path(name), scores)
        for row in list(expected)[::23]:  # gaps in the ids
            idx.remove(row)
            del expected[row]
    yield idx, expected
    idx.close()


def _holds(term, scores: np.ndarray) -> bool:
    if isinstance(term, RatingTerm):
        holds = RATINGS[int(np.argmax(scores[-3:]))] == term.rating
    else:
        holds = OPS[term.op](float(scores[term.tag]), float(np.float32(term.value)))
    return holds != term.negate


def _reference(expected, terms, k):
    rows = sorted((key, row) for row, (key, scores) in expected.items() if all(_holds(t, scores) for t in terms))
    return [row for _, row in rows][:k]


_term = st.one_of(
    st.builds(lambda neg, r: f"{'-' if neg else ''}rating:{r}", st.booleans(), st.sampled_from(RATINGS)),
    st.builds(
        lambda neg, tag, op, bound: f"{'-' if neg else ''}{tag}{op}{bound}",
        st.booleans(),
        st.sampled_from([0, 1, 2]),
        st.sampled_from(list(OPS)),
        st.sampled_from(BOUNDS),
    ),
)
PLANS = ("walk", "bitmap", "sort", "auto")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(_term, max_size=3),
    st.sampled_from([None, 1, 3, 40, 1000]),
    st.sampled_from(PLANS),
)
def test_every_plan_lists_the_matches_in_path_order(collection, monkeypatch, spec, k, plan):
    idx, expected = collection
    text = " ".join(spec)
    for tag in (0, 1, 2):  # the strategy names tags by column: the query names them by name
        text = text.replace(f"{tag}>", f"{idx.tags[tag].replace(' ', '_')}>").replace(
            f"{tag}<", f"{idx.tags[tag].replace(' ', '_')}<"
        )
    terms = parse(text, idx.tags)
    with monkeypatch.context() as m:
        if plan != "walk" and plan != "auto":
            m.setattr(query, "_walk", lambda *a: None)
        if plan == "walk":
            m.setattr(query, "WALK_ROWS", 10**9)
        if plan == "bitmap":
            m.setattr(query, "WALK_COST", 10**9)
        if plan == "sort":
            m.setattr(query, "WALK_COST", -1)
        hits = search(idx, terms, k=k)
    assert [h.row for h in hits] == _reference(expected, terms, k), (text, k, plan)
    assert all(h.path == os.fsdecode(expected[h.row][0]) for h in hits)


def test_the_walk_gives_up_on_few_matches_and_another_plan_answers(collection, monkeypatch):
    idx, expected = collection
    walked = []
    real = query._walk
    monkeypatch.setattr(query, "_walk", lambda *a: walked.append(out := real(*a)) or out)
    monkeypatch.setattr(query, "WALK_ROWS", 10)  # 20 K = 40 rows hold fewer than 2 matches of a rare term
    terms = parse(f"{idx.tags[1].replace(' ', '_')}>=0.9", idx.tags)
    hits = search(idx, terms, k=2)
    assert walked == [None]
    assert [h.row for h in hits] == _reference(expected, terms, 2)
    assert len(hits) == 2
