"""`i2v features` and feature files: golden values, both formats, row/path alignment, model-kind errors."""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.features import (
    FeatureFileError,
    FeatureWriter,
    binarize,
    feature_json,
    paths_file_for,
    read_features,
)


@pytest.fixture
def runner():
    return CliRunner()


def features(runner, *args, weights, input=None):
    return runner.invoke(cli, ["features", "--workers", "0", "--weights", str(weights), *map(str, args)], input=input)


@pytest.fixture(scope="module")
def expected(golden):
    return np.load(golden / "expected" / "feature_v1.npy"), np.load(golden / "expected" / "feature_v1_binary.npy")


@pytest.fixture
def broken_in_the_middle(tmp_path, golden):
    """sq/img000, a text file, sq/img001, an empty file, sq/img002: the good ones are golden rows 0, 1, 2."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    shutil.copy(golden / "images" / "sq" / "img000.png", folder / "a1.png")
    (folder / "a2.png").write_text("not an image")
    shutil.copy(golden / "images" / "sq" / "img001.png", folder / "a3.png")
    (folder / "a4.png").write_bytes(b"")  # (a missing file named explicitly is a usage error, not a record)
    shutil.copy(golden / "images" / "sq" / "img002.png", folder / "a5.png")
    return [folder / "a1.png", folder / "a2.png", folder / "a3.png", folder / "a4.png", folder / "a5.png"]


# --------------------------------------------------------------------------------------------------------------
# Golden values


def test_float_features_equal_the_original_pipeline(runner, feature_weights, golden, golden_order, expected, tmp_path):
    out = tmp_path / "vecs.npy"
    result = features(runner, *golden_order, "-o", out, weights=feature_weights)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    ff = read_features(out)
    assert ff.paths == [str(p) for p in golden_order]
    assert not ff.binary and ff.dim == 128 and ff.vectors.dtype == np.float32 and ff.vectors.shape == (12, 128)
    want, _ = expected
    sq = np.array(["/sq/" in p for p in ff.paths])
    assert sq.sum() == 3
    # 224x224 images (the network alone): within 1e-3 relative. Measured: 1.3e-6 relative to the vector's norm,
    # max abs 8.2e-6, max per value 3.9e-4 (on a value of 0.0012; as batching changes the float summation order,
    # a value that close to 0 can reach 3.5e-3 relative, so values below 0.01 are held to 1e-5 absolute).
    np.testing.assert_allclose(ff.vectors[sq], want[sq], rtol=1e-3, atol=1e-5)
    assert (np.linalg.norm(ff.vectors[sq] - want[sq], axis=1) / np.linalg.norm(want[sq], axis=1)).max() < 1e-5
    # Resized images: measured max abs error 1.24e-5 (values up to ~10); relative to the vector's norm 1.6e-6.
    mixed = ff.vectors[~sq]
    assert np.abs(mixed - want[~sq]).max() < 5e-5
    assert (np.linalg.norm(mixed - want[~sq], axis=1) / np.linalg.norm(want[~sq], axis=1)).max() < 1e-5
    # A plain .npy: NumPy reads it without i2v.
    np.testing.assert_array_equal(np.load(out), ff.vectors)


def test_binary_features_equal_the_original_pipeline(runner, feature_weights, golden_order, expected, tmp_path):
    out = tmp_path / "bits.npy"
    result = features(runner, *golden_order, "--binary", "-o", out, weights=feature_weights)
    assert result.exit_code == 0, result.output
    ff = read_features(out)
    want, want_bits = expected
    assert ff.binary and ff.dim == 128 and ff.vectors.dtype == np.uint8 and ff.vectors.shape == (12, 16)
    differ = np.unpackbits(ff.vectors, axis=1) != np.unpackbits(want_bits, axis=1)
    assert np.all(np.abs(want[differ]) < 1e-3)  # only bits whose encode1 is within 1e-3 of 0 may differ
    assert differ.sum() == 0  # measured: none do


def test_binarize_is_packbits_of_sigmoid():
    x = np.array([[-2.0, 0.0, 1e-6, 3.0, -1e-6, 5.0, 0.5, -0.5, 1.0]], dtype=np.float32)
    sigmoid = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_array_equal(binarize(x), np.packbits(sigmoid > 0.5, axis=1))
    assert binarize(x).tolist() == [[0b00110110, 0b10000000]]


# --------------------------------------------------------------------------------------------------------------
# Formats


def test_jsonl_streams_path_and_feature(runner, feature_weights, golden, tmp_path, broken_in_the_middle):
    npy = tmp_path / "vecs.npy"
    assert features(runner, *broken_in_the_middle, "-o", npy, weights=feature_weights).exit_code == 1
    result = features(runner, *broken_in_the_middle, "--format", "jsonl", weights=feature_weights)
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(p) for p in broken_in_the_middle]
    assert [list(r) for r in records] == [["path", "feature"], ["path", "error"]] * 2 + [["path", "feature"]]
    # Values are float32's shortest decimal form: read back, they are the very same float32 values.
    vectors = np.array([r["feature"] for r in records if "feature" in r], dtype=np.float32)
    np.testing.assert_array_equal(vectors, read_features(npy).vectors)
    assert records[1]["error"] == f"{broken_in_the_middle[1]}: a text file, not an image"
    assert records[3]["error"] == f"{broken_in_the_middle[3]}: empty file (0 bytes)"


def test_jsonl_binary_is_the_packed_bytes(runner, feature_weights, golden, expected, tmp_path):
    out = tmp_path / "bits.jsonl"
    result = features(runner, golden / "images" / "sq", "--binary", "-o", out, weights=feature_weights)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["feature"] for r in records] == expected[1][:3].tolist()


def test_feature_json_round_trips_float32():
    x = np.array([0.1, -3.0, 1e-8, 123456.78, np.float32(1) / 3], dtype=np.float32)
    assert feature_json(x) == "[0.1,-3.0,1e-08,123456.78,0.33333334]"
    np.testing.assert_array_equal(np.array(json.loads(feature_json(x)), dtype=np.float32), x)
    assert feature_json(np.array([0, 255, 7], dtype=np.uint8)) == "[0,255,7]"


def test_npy_needs_an_output_file(runner, feature_weights, golden):
    result = features(runner, golden / "images" / "sq", "--format", "npy", weights=feature_weights)
    assert result.exit_code == 2
    assert "give -o FILE.npy" in result.stderr


def test_unwritable_output_is_a_usage_error(runner, feature_weights, golden, tmp_path):
    result = features(runner, golden / "images" / "sq", "-o", tmp_path / "no" / "vecs.npy", weights=feature_weights)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "cannot write" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Row/path alignment


def test_failures_never_shift_rows(runner, feature_weights, expected, tmp_path, broken_in_the_middle):
    out = tmp_path / "vecs.npy"
    result = features(runner, *broken_in_the_middle, "-o", out, "--batch-size", "2", weights=feature_weights)
    assert result.exit_code == 1
    assert result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"i2v: {broken_in_the_middle[0].parent}")]
    assert [line.split(": ")[1] for line in errors] == [str(broken_in_the_middle[1]), str(broken_in_the_middle[3])]
    assert "i2v: 2 of 5 inputs failed (they have no row)" in result.stderr
    ff = read_features(out)
    good = [broken_in_the_middle[i] for i in (0, 2, 4)]
    assert ff.paths == [str(p) for p in good]
    np.testing.assert_allclose(ff.vectors, expected[0][:3], rtol=1e-3, atol=1e-5)  # sq/img000, img001, img002
    assert [ff.row(str(p)) for p in broken_in_the_middle] == [0, None, 1, None, 2]


def test_every_input_failing_gives_an_empty_pair(runner, feature_weights, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = tmp_path / "vecs.npy"
    result = features(runner, bad, "-o", out, weights=feature_weights)
    assert result.exit_code == 1
    ff = read_features(out)
    assert ff.paths == [] and ff.vectors.shape == (0, 128)


def test_paths_from_stdin_and_the_header(runner, feature_weights, golden, tmp_path, monkeypatch):
    monkeypatch.chdir(golden / "images")
    out = tmp_path / "vecs.npy"
    result = features(runner, "-", "-o", out, weights=feature_weights, input="sq/img001.png\nsq/img000.png\n")
    assert result.exit_code == 0, result.output
    lines = paths_file_for(out).read_text().splitlines()
    assert lines[1:] == ['"sq/img001.png"', '"sq/img000.png"']
    header = json.loads(lines[0])
    assert {k: header[k] for k in ("format", "version", "kind", "rows", "dim", "dtype", "vectors", "cwd")} == {
        "format": "i2v-features",
        "version": 2,
        "kind": "float",
        "rows": 2,
        "dim": 128,
        "dtype": "float32",
        "vectors": "vecs.npy",
        "cwd": str(golden / "images"),
    }
    assert header["model"]["source"] == "feature_v1.caffemodel" and len(header["model"]["sha256"]) == 64
    ff = read_features(out)
    # A stored relative path is found however the file is named, from any folder.
    monkeypatch.chdir(tmp_path)
    assert ff.row(str(golden / "images" / "sq" / "img000.png")) == 1
    assert ff.row("sq/img001.png") == 0
    assert ff.row("sq/img002.png") is None
    assert sorted(os.listdir(tmp_path)) == [".vecs.npy.i2v.json", "vecs.npy", "vecs.paths.jsonl"]  # + its job file


# --------------------------------------------------------------------------------------------------------------
# Model kinds


def test_tag_model_where_the_feature_model_is_needed(runner, tag_weights, golden):
    result = features(runner, golden / "images" / "sq", "-f", "jsonl", weights=tag_weights)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"{tag_weights} is a tag model (conv6_4); feature extraction needs the feature model" in result.stderr


def test_feature_model_where_the_tag_model_is_needed(runner, feature_weights, golden):
    result = runner.invoke(cli, ["tag", "-j", "0", "-w", str(feature_weights), str(golden / "images" / "sq")])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert f"{feature_weights} is a feature model (encode1); `i2v tag` needs the tag model" in result.stderr


# --------------------------------------------------------------------------------------------------------------
# Writing and reading feature files


ODD_PATHS = ["a.png", "dir/with space/ü.png", 'q"uote,comma.png', "new\nline.png", os.fsdecode(b"bad\xffbyte.png")]


@pytest.mark.parametrize("binary", [False, True])
def test_writer_round_trip(tmp_path, binary):
    rng = np.random.default_rng(0)
    dim = 64
    rows = rng.integers(0, 256, (5, 8), dtype=np.uint8) if binary else rng.standard_normal((5, dim), np.float32)
    out = tmp_path / "vecs.npy"
    with FeatureWriter(out, dim=dim, binary=binary, model={"source": "m", "sha256": "00"}) as w:
        w.append(ODD_PATHS[:2], rows[:2])
        w.append([], rows[:0])
        w.append(ODD_PATHS[2:], rows[2:])
        assert not out.exists()  # in place only when done
    ff = read_features(out)
    assert (
        ff.paths == ODD_PATHS and ff.binary is binary and ff.dim == dim and ff.model == {"source": "m", "sha256": "00"}
    )
    np.testing.assert_array_equal(ff.vectors, rows)
    assert isinstance(ff.vectors, np.memmap)
    assert read_features(paths_file_for(out)).paths == ODD_PATHS  # either file of the pair opens it
    assert sorted(os.listdir(tmp_path)) == ["vecs.npy", "vecs.paths.jsonl"]
    assert [ff.row(p) for p in ODD_PATHS] == [0, 1, 2, 3, 4]


def test_writer_aborted_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), FeatureWriter(tmp_path / "vecs.npy", dim=4) as w:
        w.append(["a"], np.ones((1, 4), np.float32))
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_writer_interrupted_keeps_the_rows_done(tmp_path):
    with pytest.raises(KeyboardInterrupt), FeatureWriter(tmp_path / "vecs.npy", dim=4) as w:
        w.append(["a", "b"], np.ones((2, 4), np.float32))
        raise KeyboardInterrupt
    assert read_features(tmp_path / "vecs.npy").paths == ["a", "b"]


def test_writer_checks_shapes(tmp_path):
    with FeatureWriter(tmp_path / "v.npy", dim=8, binary=True) as w:
        with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
            w.append(["a", "b"], np.zeros((2, 2), np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            w.append(["a"], np.zeros((1, 1), np.float32))


def test_writer_memory_is_bounded(tmp_path):
    """Rows go to disk batch by batch: 40 MB written with about one batch (1 MB) in memory at a time."""
    batch = np.ones((256, 1024), np.float32)
    names = [f"img{i}.png" for i in range(256)]
    tracemalloc.start()
    with FeatureWriter(tmp_path / "vecs.npy", dim=1024) as w:
        for _ in range(40):
            w.append(names, batch)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * batch.nbytes
    assert read_features(tmp_path / "vecs.npy").vectors.shape == (40 * 256, 1024)


def _pair(tmp_path, name, values):
    with FeatureWriter(tmp_path / name, dim=4) as w:
        w.append([f"{name}-{i}" for i in range(len(values))], np.asarray(values, np.float32))
    return tmp_path / name


def test_reader_refuses_vectors_of_another_run(tmp_path):
    a = _pair(tmp_path, "a.npy", np.ones((3, 4)))
    b = _pair(tmp_path, "b.npy", np.zeros((3, 4)))
    shutil.copy(b, a)
    with pytest.raises(FeatureFileError, match="do not belong together: the vectors are not the ones written"):
        read_features(a)


def test_reader_refuses_row_count_mismatch(tmp_path):
    a = _pair(tmp_path, "a.npy", np.ones((3, 4)))
    np.save(a, np.ones((2, 4), np.float32))
    with pytest.raises(FeatureFileError, match="2 vectors, 3 paths"):
        read_features(a)


def test_reader_refuses_other_dtype(tmp_path):
    a = _pair(tmp_path, "a.npy", np.ones((3, 4)))
    np.save(a, np.ones((3, 4), np.float64))
    with pytest.raises(FeatureFileError, match="float64"):
        read_features(a)


def test_reader_needs_the_paths_file(tmp_path):
    np.save(tmp_path / "plain.npy", np.ones((2, 4), np.float32))
    with pytest.raises(FeatureFileError, match=r"plain\.paths\.jsonl: no such file"):
        read_features(tmp_path / "plain.npy")


def test_reader_refuses_a_damaged_paths_file(tmp_path):
    a = _pair(tmp_path, "a.npy", np.ones((2, 4)))
    p = paths_file_for(a)
    p.write_text(p.read_text() + "not json\n")
    with pytest.raises(FeatureFileError, match="damaged"):
        read_features(a)
    p.write_text('{"x": 1}\n')
    with pytest.raises(FeatureFileError, match="not an i2v features paths file"):
        read_features(a)


def test_a_vectors_file_and_a_folder_not_named_in_utf8(runner, feature_weights, golden_order, tmp_path, monkeypatch):
    """The paths file's header names the vectors file and the folder it was written from exactly (shown as \\xNN,
    plus the bytes), as records name files: the run crashed writing it, and a reader must find both again."""
    folder = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"cw\xff"))
    os.mkdir(folder)
    for p in golden_order[:2]:
        shutil.copy(p, folder)
    monkeypatch.chdir(folder)
    name = os.fsdecode(b"v\xfe.npy")
    result = runner.invoke(cli, ["features", "img000.png", "img001.png", "-w", str(feature_weights), "-o", name])
    assert result.exit_code == 0, result.output
    with open(os.fsdecode(b"v\xfe.paths.jsonl"), encoding="utf-8") as f:
        header = json.loads(f.readline())
    assert header["vectors"] == "v\\xfe.npy" and header["cwd"].endswith("cw\\xff")
    monkeypatch.chdir(tmp_path)
    found = read_features(os.path.join(folder, os.fsdecode(b"v\xfe.paths.jsonl")))
    assert found.vectors.shape[0] == 2 and found.row(os.path.join(folder, "img001.png")) == 1


def test_a_text_file_named_npy_is_called_what_it_is(tmp_path):
    """NumPy's message for it was "Cannot load file containing pickled data when allow_pickle=False"."""
    out = tmp_path / "vecs.npy"
    with FeatureWriter(out, dim=4, binary=False, model={"source": "m", "sha256": "00"}) as w:
        w.append(["a.png"], np.ones((1, 4), np.float32))
    out.write_text("not an array\n")
    with pytest.raises(FeatureFileError, match=r"vecs.npy is not a .npy array \(NumPy's header is missing\)$"):
        read_features(out)


def test_a_full_disk_midway_is_a_write_error(runner, feature_weights, golden, full_folder):
    """A disk that filled while the rows were written was exit 2 (a usage error), not 3 (a failed write)."""
    fill = full_folder / "fill"
    os.truncate(fill, fill.stat().st_size - 4096)  # one page: the vectors' file starts, the paths' never fits
    result = features(runner, golden / "images" / "sq", "-o", full_folder / "vecs.npy", weights=feature_weights)
    assert result.exit_code == 3, result.output
    assert result.stderr.count("\n") == 1 and "No space left on device" in result.stderr
    left = sorted(p.name for p in full_folder.iterdir())
    assert left == [".vecs.npy.i2v.json", "fill"]  # the run's job file; nothing half-written


def test_a_paths_file_that_is_not_a_regular_file_is_refused(runner, feature_weights, golden, tmp_path):
    """A FIFO as FILE.paths.jsonl hung the run for ever: the paths are read back from it to be finished."""
    os.mkfifo(tmp_path / "vecs.paths.jsonl")
    result = features(runner, golden / "images" / "sq", "-o", tmp_path / "vecs.npy", weights=feature_weights)
    assert result.exit_code == 2 and "not a regular file" in result.stderr, result.output
    assert not (tmp_path / "vecs.npy").exists()


def test_the_paths_file_of_a_pair_is_never_an_output(runner, feature_weights, tag_weights, golden, tmp_path):
    """-o vecs.paths.jsonl (features as JSONL, or tags) would part vecs.npy from its paths: refused, the pair stays
    readable; writing the pair again is fine."""
    npy = tmp_path / "vecs.npy"
    images = golden / "images" / "sq"
    assert features(runner, images, "-o", npy, weights=feature_weights).exit_code == 0
    paths = paths_file_for(npy)
    before = paths.read_bytes()
    for command, weights in (("features", feature_weights), ("tag", tag_weights)):
        result = runner.invoke(
            cli, [command, "--workers", "0", "--weights", str(weights), str(images), "-o", str(paths)]
        )
        assert result.exit_code == 2, result.output
        assert "is the paths file of a feature pair" in result.stderr and "Traceback" not in result.stderr
    assert paths.read_bytes() == before and len(read_features(npy).paths) == 3
    assert features(runner, images, "-o", npy, weights=feature_weights).exit_code == 0


def test_a_pair_written_through_a_symlink_stays_whole(runner, feature_weights, golden, tmp_path):
    """-o link.npy (a link to a.npy) replaced a.npy but wrote link.paths.jsonl: a.npy and a.paths.jsonl no longer
    belonged together and the earlier pair was lost. Both halves now go beside the target; the link stays."""
    sq, mixed = golden / "images" / "sq", golden / "images" / "mixed"
    target = tmp_path / "a.npy"
    assert features(runner, sq, "-o", target, weights=feature_weights).exit_code == 0
    link = tmp_path / "link.npy"
    link.symlink_to("a.npy")
    n = len(list(mixed.iterdir()))
    result = features(runner, mixed, "-o", link, weights=feature_weights)
    assert result.exit_code in (0, 1), result.output
    assert link.is_symlink() and not (tmp_path / "link.paths.jsonl").exists()
    for name in (target, link, tmp_path / "a.paths.jsonl"):
        pair = read_features(name)
        assert len(pair.paths) == pair.vectors.shape[0] and 0 < len(pair.paths) <= n
    resumed = features(runner, mixed, "-o", link, "--resume", weights=feature_weights)
    assert resumed.exit_code in (0, 1) and "already in" in resumed.stderr, resumed.output
    (tmp_path / "a.paths.jsonl").rename(tmp_path / "link.paths.jsonl")  # as i2v wrote it through a link before
    assert len(read_features(link).paths) == read_features(link).vectors.shape[0]
