"""Exact search against brute-force NumPy answers, and `i2v similar` end to end."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from i2v_cli.cli import cli
from i2v_cli.features import FeatureWriter, read_features
from i2v_cli.similar import _popcount_table, cosine, hamming, popcount, search


def brute_cosine(index, queries):
    index, queries = index.astype(np.float64), queries.astype(np.float64)
    norms = np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(index, axis=1)[None, :]
    return np.where(norms > 0, queries @ index.T / np.where(norms > 0, norms, 1), 0.0)


def brute_hamming(index, queries):
    bits, qbits = np.unpackbits(index, axis=1), np.unpackbits(queries, axis=1)
    return (bits[None, :, :] != qbits[:, None, :]).sum(axis=2)


def brute_top(keys, k, exclude=None):
    """Rows by (key, row), smallest first, as the search promises."""
    rows = np.arange(keys.shape[0])
    if exclude is not None:
        rows = rows[rows != exclude]
    return rows[np.lexsort((rows, keys[rows]))][:k]


# --------------------------------------------------------------------------------------------------------------
# Library


@pytest.mark.parametrize("chunk_rows", [None, 1, 7, 1000])
@pytest.mark.parametrize("k", [1, 10, 999, 5000])
def test_float_search_matches_brute_force(chunk_rows, k):
    rng = np.random.default_rng(k)
    index = rng.standard_normal((999, 48)).astype(np.float32)
    index[10] = 0  # a zero vector is 0 from everything
    queries = rng.standard_normal((5, 48)).astype(np.float32)
    queries[4] = index[500]
    sims = brute_cosine(index, queries)
    found = search(index, queries, k, chunk_rows=chunk_rows)
    assert len(found) == 5
    for i, hits in enumerate(found):
        want = brute_top(-sims[i], k)
        np.testing.assert_array_equal(hits.rows, want)
        np.testing.assert_allclose(hits.scores, sims[i][want], rtol=0, atol=1e-6)
        assert hits.scores.dtype == np.float32
    assert found[4].rows[0] == 500 and abs(found[4].scores[0] - 1) < 1e-6


@pytest.mark.parametrize("chunk_rows", [None, 1, 13, 4096])
@pytest.mark.parametrize("width", [2, 16, 64])  # 16 bits: ties everywhere; 64 bytes: the uint64 path
def test_binary_search_matches_brute_force_exactly(chunk_rows, width):
    rng = np.random.default_rng(width)
    index = rng.integers(0, 256, (3000, width), dtype=np.uint8)
    queries = rng.integers(0, 256, (4, width), dtype=np.uint8)
    dist = brute_hamming(index, queries)
    for k in (1, 10, 3000):
        found = search(index, queries, k, chunk_rows=chunk_rows)
        for i, hits in enumerate(found):
            want = brute_top(dist[i], k)
            np.testing.assert_array_equal(hits.rows, want)
            np.testing.assert_array_equal(hits.scores, dist[i][want])
            assert hits.scores.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(
    index=arrays(np.uint8, st.tuples(st.integers(1, 60), st.just(3))),
    k=st.integers(1, 70),
    chunk=st.integers(1, 70),
    skip=st.integers(0, 59),
)
def test_binary_search_property(index, k, chunk, skip):
    queries = index[: min(3, len(index))]
    dist = brute_hamming(index, queries)
    exclude = [skip if skip < len(index) else None] + [None] * (len(queries) - 1)
    for i, hits in enumerate(search(index, queries, k, exclude=exclude, chunk_rows=chunk)):
        want = brute_top(dist[i], k, exclude[i])
        np.testing.assert_array_equal(hits.rows, want)
        np.testing.assert_array_equal(hits.scores, dist[i][want])


@settings(max_examples=40, deadline=None)
@given(
    index=arrays(
        np.float32, st.tuples(st.integers(1, 40), st.just(4)), elements=st.sampled_from([-2.0, -1.0, 0.0, 1.0, 3.0])
    ),
    k=st.integers(1, 50),
    chunk=st.integers(1, 50),
)
def test_float_search_property_with_ties(index, k, chunk):
    """Small integer vectors: many equal scores; ties go to the lower row, as brute force orders them."""
    queries = index[:2]
    sims = brute_cosine(index, queries)
    for i, hits in enumerate(search(index, queries, k, chunk_rows=chunk)):
        np.testing.assert_allclose(hits.scores, np.sort(sims[i])[::-1][: min(k, len(index))], atol=1e-6)
        np.testing.assert_allclose(sims[i][hits.rows], hits.scores, atol=1e-6)
        assert len(set(hits.rows.tolist())) == len(hits.rows)


def test_exclude_leaves_the_query_row_out():
    index = np.zeros((6, 1), np.uint8)
    index[2] = 1
    found = search(index, index[[2, 2]], 3, exclude=[2, None])
    assert found[0].rows.tolist() == [0, 1, 3]  # all equally far: the lowest rows, row 2 left out
    assert found[1].rows.tolist() == [2, 0, 1]
    floats = np.eye(6, dtype=np.float32) + 0.1
    assert 2 not in search(floats, floats[2], 5, exclude=[2])[0].rows.tolist()


def test_popcount_table_matches_numpy():
    rng = np.random.default_rng(0)
    for dtype in (np.uint8, np.uint16, np.uint64):
        x = rng.integers(0, np.iinfo(dtype).max, (50, 7), dtype=dtype, endpoint=True)
        expected = np.array([[bin(int(v)).count("1") for v in row] for row in x])
        np.testing.assert_array_equal(_popcount_table(x), expected)
        np.testing.assert_array_equal(popcount(x), expected)


def test_helpers_and_argument_checks():
    a = np.array([[0b11110000, 0], [255, 255]], dtype=np.uint8)
    assert hamming(a, a[:1]).tolist() == [[0, 12]]
    np.testing.assert_allclose(
        cosine(np.array([[1, 0], [1, 1], [0, 0]], np.float32), np.array([2, 0], np.float32)),
        [[1, np.sqrt(0.5), 0]],
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="columns"):
        search(np.zeros((3, 4), np.float32), np.zeros((1, 5), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        search(np.zeros((3, 4), np.uint8), np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="k must be"):
        search(np.zeros((3, 4), np.float32), np.zeros(4, np.float32), 0)
    assert search(np.zeros((0, 4), np.float32), np.ones(4, np.float32), 5)[0].rows.tolist() == []


def test_search_a_memory_mapped_feature_file(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.integers(0, 256, (500, 8), dtype=np.uint8)
    with FeatureWriter(tmp_path / "bits.npy", dim=64, binary=True) as w:
        w.append([f"{i}.png" for i in range(500)], vectors)
    ff = read_features(tmp_path / "bits.npy")
    assert isinstance(ff.vectors, np.memmap)
    hits = search(ff.vectors, vectors[7], 5, chunk_rows=64)[0]
    np.testing.assert_array_equal(hits.rows, brute_top(brute_hamming(vectors, vectors[7:8])[0], 5))


# --------------------------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def indexed(tmp_path, golden, feature_weights, monkeypatch):
    """The golden sq images and three mixed ones copied to imgs/, indexed (float and binary) from tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    for i, src in enumerate(
        ["sq/img000.png", "sq/img001.png", "sq/img002.png", "mixed/img001.png", "mixed/img004.png"]
    ):
        shutil.copy(golden / "images" / src, tmp_path / "imgs" / f"im{i}.png")
    for extra in ([], ["--binary"]):
        out = "bits.npy" if extra else "vecs.npy"
        result = CliRunner().invoke(cli, ["features", "imgs", "-j", "0", "-w", str(feature_weights), "-o", out, *extra])
        assert result.exit_code == 0, result.output
    return tmp_path


def similar(runner, *args, weights=None):
    extra = ["--weights", str(weights)] if weights else []
    return runner.invoke(cli, ["similar", "--workers", "0", *extra, *map(str, args)])


def test_query_by_indexed_path_needs_no_model(runner, indexed, monkeypatch):
    monkeypatch.setenv("I2V_WEIGHTS", str(indexed / "nowhere"))
    result = similar(runner, "imgs/im0.png", "--index", "vecs.npy", "-k", "2", "--format", "jsonl")
    assert result.exit_code == 0, result.output
    ff = read_features("vecs.npy")
    sims = brute_cosine(np.asarray(ff.vectors), np.asarray(ff.vectors[:1]))[0]
    want = brute_top(-sims, 2, exclude=0)
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["query"] == "imgs/im0.png" and record["row"] == 0
    assert [h["row"] for h in record["results"]] == want.tolist()
    assert [h["path"] for h in record["results"]] == [ff.paths[r] for r in want]
    assert [h["score"] for h in record["results"]] == [
        float(str(np.float32(s))) for s in search(ff.vectors, ff.vectors[0], 2, exclude=[0])[0].scores
    ]
    np.testing.assert_allclose([h["score"] for h in record["results"]], sims[want], atol=1e-6)


def test_query_by_image_file_computes_its_feature(runner, indexed, feature_weights):
    shutil.copy(indexed / "imgs" / "im3.png", indexed / "query.png")
    result = similar(runner, "query.png", "--index", "vecs.npy", "-k", "3", "-f", "json", weights=feature_weights)
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["query"] == "query.png" and record["row"] is None
    assert record["results"][0]["path"] == "imgs/im3.png" and abs(record["results"][0]["score"] - 1) < 1e-5
    by_row = similar(runner, "imgs/im3.png", "-i", "vecs.npy", "-k", "3", "-f", "json", "--include-self")
    assert [h["path"] for h in json.loads(by_row.stdout)[0]["results"]] == [h["path"] for h in record["results"]]


def test_binary_index_ranks_by_hamming_distance(runner, indexed, feature_weights):
    shutil.copy(indexed / "imgs" / "im1.png", indexed / "q.png")
    result = similar(
        runner, "q.png", "imgs/im1.png", "-i", "bits.npy", "-k", "10", "-f", "jsonl", weights=feature_weights
    )
    assert result.exit_code == 0, result.output
    from_file, from_row = [json.loads(line) for line in result.stdout.splitlines()]
    ff = read_features("bits.npy")
    dist = brute_hamming(np.asarray(ff.vectors), np.asarray(ff.vectors[1:2]))[0]
    assert [(h["row"], h["distance"]) for h in from_file["results"]] == [(r, dist[r]) for r in brute_top(dist, 10)]
    assert from_file["results"][0] == {"row": 1, "path": "imgs/im1.png", "distance": 0}
    assert from_row["results"] == from_file["results"][1:]  # its own row left out; k exceeds the rest


def test_text_format(runner, indexed, feature_weights):
    result = similar(runner, "imgs/im0.png", "imgs/im4.png", "-i", "bits.npy", "-k", "2")
    assert result.exit_code == 0, result.output
    ff = read_features("bits.npy")
    dist = brute_hamming(np.asarray(ff.vectors), np.asarray(ff.vectors[[0, 4]]))
    lines = []
    for i, (q, row) in enumerate([("imgs/im0.png", 0), ("imgs/im4.png", 4)]):
        lines += ([""] if i else []) + [f"{q}: (hamming distance)"]
        lines += [f"  {dist[i][r]:5d}  {ff.paths[r]}" for r in brute_top(dist[i], 2, exclude=row)]
    assert result.stdout == "\n".join(lines) + "\n"
    # a query with no result (a one-image index, itself left out) still names the index's measure
    one = CliRunner().invoke(cli, ["features", "imgs/im0.png", "-j", "0", "-w", str(feature_weights), "-o", "one.npy",
                                   "--binary"])  # fmt: skip
    assert one.exit_code == 0, one.output
    assert similar(runner, "imgs/im0.png", "-i", "one.npy").stdout == "imgs/im0.png: (hamming distance)\n"
    text = similar(runner, "imgs/im0.png", "-i", "vecs.npy", "-k", "1").stdout.splitlines()
    assert (
        text[0] == "imgs/im0.png: (cosine similarity)"
        and re.fullmatch(r"  0\.\d{6}  imgs/im\d\.png", text[1])
        and len(text) == 2
    )


def test_text_paths_open_from_here_when_written_from_a_non_utf8_folder(runner, golden, feature_weights, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    """The text format shows stored paths as they open from the current folder: the features' folder was taken
    from the header's \\xNN text, not its exact bytes, so from inside it im0.png showed as ../caf\\xe9/imgs/..."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    (folder / "imgs").mkdir(parents=True)
    for i in range(2):
        shutil.copy(golden / "images" / "sq" / f"img00{i}.png", folder / "imgs" / f"im{i}.png")
    monkeypatch.chdir(folder)
    result = runner.invoke(cli, ["features", "imgs", "-j", "0", "-w", str(feature_weights), "-o", "vecs.npy"])
    assert result.exit_code == 0, result.output
    result = similar(runner, "imgs/im0.png", "-i", "vecs.npy", "-k", "1")
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"imgs/im0\.png: \(cosine similarity\)\n  -?[01]\.\d{6}  imgs/im1\.png\n", result.stdout)


def test_index_paths_resolve_from_another_folder(runner, indexed, monkeypatch):
    monkeypatch.chdir(indexed / "imgs")
    result = similar(runner, "im2.png", "-i", "../vecs.paths.jsonl", "-k", "1", "-f", "jsonl")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["row"] == 2


def test_unknown_query_fails_alone(runner, indexed):
    result = similar(runner, "missing.png", "imgs/im0.png", "-i", "vecs.npy", "-k", "1", "-f", "jsonl")
    assert result.exit_code == 1
    first, second = [json.loads(line) for line in result.stdout.splitlines()]
    assert first == {"query": "missing.png", "error": "not in the index vecs.npy and no such file"}
    assert second["row"] == 0
    assert "i2v: missing.png: not in the index vecs.npy and no such file" in result.stderr
    assert "i2v: 1 of 2 queries failed" in result.stderr


def test_tag_model_for_an_image_query(runner, indexed, tag_weights):
    shutil.copy(indexed / "imgs" / "im1.png", indexed / "q.png")
    result = similar(runner, "q.png", "-i", "vecs.npy", weights=tag_weights)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert f"{tag_weights} is a tag model (conv6_4); feature extraction needs the feature model" in result.stderr


def test_broken_index_is_a_usage_error(runner, indexed):
    shutil.copy("bits.npy", "vecs.npy")
    result = similar(runner, "imgs/im0.png", "-i", "vecs.npy")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "do not belong together" in result.stderr
    result = similar(runner, "imgs/im0.png", "-i", "nothing.npy")
    assert result.exit_code == 2 and "nothing.npy: no such file" in result.stderr


@pytest.mark.parametrize(
    "how", ["an image file", "a folder of them", "an indexed path", "an indexed path from elsewhere"]
)
def test_output_naming_a_query_is_refused(runner, indexed, feature_weights, monkeypatch, how):
    """The query images were not counted as inputs: `-o` naming one overwrote the picture with the results."""
    (indexed / "q").mkdir()
    shutil.copy(indexed / "imgs" / "im1.png", indexed / "q" / "new.png")
    query, target = {
        "an image file": ("q/new.png", "q/new.png"),
        "a folder of them": ("q", "q/new.png"),
        "an indexed path": ("imgs/im0.png", "imgs/im0.png"),
        "an indexed path from elsewhere": ("imgs/im0.png", "../imgs/im0.png"),
    }[how]
    if how.endswith("elsewhere"):
        monkeypatch.chdir(indexed / "q")
        query = "imgs/im0.png"  # as stored: it opens from the folder the features were written in
    before = (indexed / target.removeprefix("../")).read_bytes()
    index = "vecs.npy" if not how.endswith("elsewhere") else "../vecs.npy"
    result = similar(runner, query, "-i", index, "-k", "1", "-o", target, weights=feature_weights)
    assert result.exit_code == 2, result.output
    assert "is one of the inputs" in result.stderr
    assert (indexed / target.removeprefix("../")).read_bytes() == before
