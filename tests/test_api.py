"""The Python API: the original release's calls and return shapes, on the golden models."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import i2v_cli as i2v
from i2v_cli.tags import Selection, select_tags


@pytest.fixture(scope="module")
def tagger(tag_weights):
    return i2v.load(tag_weights, device="cpu")


@pytest.fixture(scope="module")
def featurer(feature_weights):
    return i2v.load(feature_weights, device="cpu")


@pytest.fixture(scope="module")
def images(golden_order):
    return [Image.open(p) for p in golden_order]


def test_estimate_probabilities_match_golden(tagger, images, golden):
    prob = tagger.estimate_probabilities(images)
    np.testing.assert_allclose(prob, np.load(golden / "expected" / "tag_v2.npy"), atol=1e-3, rtol=0)


def test_arrays_and_images_give_the_same_scores(tagger, images):
    arrays = [np.asarray(images[0].convert("RGB")), np.asarray(images[0].convert("RGB")).astype(np.float32)]
    prob = tagger.estimate_probabilities([images[0], *arrays])
    np.testing.assert_allclose(prob[1:], prob[[0, 0]], atol=1e-6)


def test_estimate_plausible_tags_shape(tagger, images):
    result = tagger.estimate_plausible_tags(images[:2], threshold=0.25)
    prob = tagger.estimate_probabilities(images[:2])
    assert len(result) == 2
    for r, p in zip(result, prob, strict=True):
        assert list(r) == ["general", "character", "copyright", "rating"]
        assert isinstance(r["rating"], list) and len(r["rating"]) == 3
        assert {t for t, _ in r["rating"]} == {"safe", "questionable", "explicit"}
        expected_general = {tagger.tags[i] for i in range(512) if p[i] > 0.25}
        assert {t for t, _ in r["general"]} == expected_general
        for cat in r.values():
            assert all(isinstance(t, str) and type(s) is float for t, s in cat)
            assert [s for _, s in cat] == sorted((s for _, s in cat), reverse=True)


def test_estimate_top_tags(tagger, images):
    result = tagger.estimate_top_tags(images[:1], n_tag=7)[0]
    assert [len(result[c]) for c in ("general", "character", "copyright", "rating")] == [7, 7, 7, 3]
    prob = tagger.estimate_probabilities(images[:1])[0]
    assert result["general"][0] == (tagger.tags[int(np.argmax(prob[:512]))], pytest.approx(float(prob[:512].max())))


def test_estimate_specific_tags(tagger, images):
    result = tagger.estimate_specific_tags(images[:2], ["1girl", "safe"])
    prob = tagger.estimate_probabilities(images[:2])
    assert result == [{"1girl": pytest.approx(float(p[0])), "safe": pytest.approx(float(p[1536]))} for p in prob]
    with pytest.raises(KeyError, match="'no such tag'"):
        tagger.estimate_specific_tags(images[:1], ["no such tag"])


def test_features_match_golden(featurer, images, golden):
    feature = featurer.extract_feature(images)
    expected = np.load(golden / "expected" / "feature_v1.npy")
    assert feature.dtype == np.float32 and feature.shape == expected.shape == (12, 128)
    np.testing.assert_allclose(feature[:3], expected[:3], rtol=1e-3, atol=1e-4)
    binary = featurer.extract_binary_feature(images)
    assert binary.dtype == np.uint8 and binary.shape == (12, 16)
    expected_bits = np.unpackbits(np.load(golden / "expected" / "feature_v1_binary.npy"), axis=1).astype(bool)
    differ = np.unpackbits(binary, axis=1).astype(bool) != expected_bits
    assert np.all(np.abs(expected[differ]) < 1e-3)


def test_wrong_model_kind_says_which_is_which(tagger, featurer, images):
    with pytest.raises(i2v.ModelKindError, match=r"needs the feature model .* is a tag model"):
        tagger.extract_feature(images[:1])
    with pytest.raises(i2v.ModelKindError, match=r"needs the tag model .* is a feature model"):
        featurer.estimate_plausible_tags(images[:1])


def test_make_i2v_with_pytorch_ports_old_scripts(golden, tmp_path):
    tag_path = tmp_path / "tag_list.json"
    tag_path.write_text((golden.parent.parent.parent / "tag_list.json").read_text())
    illust2vec = i2v.make_i2v_with_pytorch(
        model_path="/old/illust2vec_tag_ver200.py",
        param_path=str(golden / "models" / "tag_v1.caffemodel"),
        tag_path=str(tag_path),
        device="cpu",
    )
    img = Image.open(golden / "images" / "sq" / "img000.png").convert("RGB")
    result = illust2vec.estimate_plausible_tags([img], threshold=0.5)
    assert isinstance(result[0]["rating"], list)
    assert i2v.make_i2v_with_chainer is i2v.make_i2v_with_pytorch


def test_empty_input(tagger):
    assert tagger.estimate_probabilities([]).shape == (0, 1539)
    assert tagger.estimate_plausible_tags([]) == []


# --- streaming: memory of one batch (issue 14 point 9) -------------------------------------------------------


def test_images_are_read_and_run_a_batch_at_a_time(tag_weights, images, monkeypatch):
    """At most ``batch_size`` images are preprocessed before the network runs them, and a generator is read
    only as the batches need it: memory is that of one batch whatever the number of images."""
    import i2v_cli.api as api

    events: list[str] = []
    real_preprocess, real_predict = api.preprocess, api.predict

    def preprocess(image):
        events.append("pre")
        return real_preprocess(image)

    def predict(net, batch, device, batch_size=None):
        events.append(f"net{len(batch)}")
        return real_predict(net, batch, device, batch_size)

    def gen():
        for img in images[:7]:
            events.append("read")
            yield img

    monkeypatch.setattr(api, "preprocess", preprocess)
    monkeypatch.setattr(api, "predict", predict)
    tagger = i2v.load(tag_weights, device="cpu", batch_size=3)
    prob = tagger.estimate_probabilities(gen())
    assert events == [*["read", "pre"] * 3, "net3", *["read", "pre"] * 3, "net3", "read", "pre", "net1"]
    monkeypatch.setattr(api, "preprocess", real_preprocess)
    monkeypatch.setattr(api, "predict", real_predict)
    np.testing.assert_allclose(prob, tagger.estimate_probabilities(images[:7]), atol=1e-6)


def test_results_per_image_methods_stream_too(tagger, images):
    gen = (img for img in images[:5])
    assert len(tagger.estimate_plausible_tags(gen)) == 5
    assert len(tagger.estimate_top_tags(iter(images[:4]), n_tag=2)) == 4
    assert len(tagger.estimate_specific_tags(iter(images[:3]), ["solo"])) == 3


# --- one image, paths, and which image failed (issue 14 point 10) ---------------------------------------------


def test_a_single_array_is_one_image_not_a_batch_of_rows(tagger, images):
    arr = np.asarray(images[3].convert("RGB").resize((120, 100)))
    assert arr.shape == (100, 120, 3)
    prob = tagger.estimate_probabilities(arr)
    assert prob.shape == (1, 1539)
    np.testing.assert_array_equal(prob, tagger.estimate_probabilities([arr]))
    grey = arr[:, :, 0]
    assert tagger.estimate_probabilities(grey).shape == (1, 1539)
    assert tagger.estimate_probabilities(torch.from_numpy(arr.copy())).shape == (1, 1539)
    # An (N, H, W, C) array is N images, as iterating it always gave.
    np.testing.assert_allclose(tagger.estimate_probabilities(np.stack([arr, arr])), prob[[0, 0]], atol=1e-6)


def test_a_single_image_or_path_gives_a_list_of_one(tagger, images, golden_order):
    path = golden_order[0]
    one = tagger.estimate_plausible_tags(images[0], threshold=0.5)
    assert isinstance(one, list) and len(one) == 1
    assert one == tagger.estimate_plausible_tags([images[0]], threshold=0.5)
    for given in (str(path), path, os.fsencode(path)):
        assert tagger.estimate_plausible_tags(given, threshold=0.5) == one
        assert tagger.estimate_top_tags(given, n_tag=3) == tagger.estimate_top_tags([images[0]], n_tag=3)
    assert tagger.estimate_probabilities([str(path), images[1]]).shape == (2, 1539)


def _mode_files(folder, golden):
    """The same drawing saved in every Pillow mode the tests use, plus the golden mixed files as they are."""
    base = Image.open(golden / "images" / "mixed" / "img001.png").convert("RGBA").resize((131, 97))
    files = {}
    modes = [
        ("RGB", "png"),
        ("RGBA", "png"),
        ("L", "png"),
        ("LA", "png"),
        ("P", "png"),
        ("1", "png"),
        ("I;16", "png"),
        ("I", "tif"),
        ("F", "tif"),
        ("CMYK", "jpg"),
        ("RGB", "jpg"),
        ("P+tRNS", "png"),
    ]
    for mode, ext in modes:
        if mode == "I;16":
            img = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
            assert img.mode == "I;16"
        else:
            img = base.convert(mode.removesuffix("+tRNS"))
        path = folder / f"{mode.replace(';', '_')}.{ext}"
        img.save(path, **({"transparency": 0} if mode == "P+tRNS" else {}))
        files[mode + "." + ext] = path
    rotated = folder / "exif6.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    base.convert("RGB").save(rotated, exif=exif)
    files["exif6.jpg"] = rotated
    for src in sorted((golden / "images" / "mixed").iterdir()):
        files["golden " + src.name] = src
    return files


@pytest.fixture(scope="module")
def mode_files(golden, tmp_path_factory):
    return _mode_files(tmp_path_factory.mktemp("modes"), golden)


def test_api_scores_equal_the_cli_for_every_mode_and_exif(tagger, tag_weights, mode_files):
    """The API's results for a file equal ``i2v tag -t 0``'s within 1e-6: one decoding path for both."""
    from click.testing import CliRunner

    from i2v_cli.cli import cli

    files = mode_files
    with Image.open(files["exif6.jpg"]) as check:
        assert check.getexif()[0x0112] == 6 and check.size == (131, 97)
    paths = [str(p) for p in files.values()]
    result = CliRunner().invoke(
        cli, ["tag", *paths, "-t", "0", "-f", "jsonl", "--workers", "0", "-w", str(tag_weights)]
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == paths
    cli_scores = np.array(
        [[{**r["general"], **r["character"], **r["copyright"], **r["rating"]}[t] for t in tagger.tags] for r in records]
    )
    # Given as str and as pathlib.Path alike.
    np.testing.assert_allclose(tagger.estimate_probabilities(paths), cli_scores, atol=1e-6, rtol=0)
    np.testing.assert_allclose(tagger.estimate_probabilities(list(files.values())), cli_scores, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name",
    ["RGB.png", "RGBA.png", "L.png", "LA.png", "P.png", "1.png", "I;16.png", "I.tif", "F.tif", "CMYK.jpg", "RGB.jpg",
     "P+tRNS.png", "golden img000.jpg", "golden img003.png", "golden img006.jpg",
     "exif6.jpg"],
)  # fmt: skip
def test_pil_images_opened_from_files_equal_the_cli(tagger, mode_files, name):
    files = mode_files
    with Image.open(files[name]) as img:
        from_pil = tagger.estimate_probabilities(img)
    np.testing.assert_allclose(from_pil, tagger.estimate_probabilities(files[name]), atol=1e-6, rtol=0)


def test_a_bad_image_in_a_list_is_named_by_index_and_path(tagger, images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(i2v.ImageInputError) as info:
        tagger.estimate_probabilities([images[0], str(broken), images[1]])
    assert str(info.value) == f"image at index 1: {broken}: truncated or corrupt PNG file (its header cannot be read)"
    assert info.value.index == 1 and info.value.path == str(broken)
    assert isinstance(info.value.__cause__, i2v.ImageDecodeError) and isinstance(info.value, ValueError)
    with pytest.raises(i2v.ImageInputError) as info:
        tagger.estimate_plausible_tags(
            iter([images[0], images[1], np.zeros((4, 4, 3), np.uint8), np.full((3, 3), np.nan)])
        )
    assert str(info.value) == "image at index 3: cannot use this ndarray: the image holds NaN or infinite values"
    assert info.value.index == 3 and info.value.path is None
    with pytest.raises(i2v.ImageInputError, match=r"^.*/missing\.png: no such file$") as info:
        tagger.estimate_probabilities(tmp_path / "missing.png")
    assert info.value.index is None
    with pytest.raises(i2v.ImageInputError) as info:  # was a bare ValueError from os.lstat
        tagger.estimate_probabilities(["/tmp/a\0b.png"])
    assert str(info.value) == "image at index 0: /tmp/a\\0b.png: no file name holds a NUL byte"


def test_messages_are_readable_anywhere_and_open_files_are_refused(tagger, images, tmp_path):
    """A name that is not UTF-8 made a message of lone surrogates (printing it to a strict UTF-8 stream raised), and
    an open file was iterated line by line, each line of its bytes taken as a path ("\\x89PNG: no such file")."""
    import io
    import tempfile

    missing = os.path.join(os.fsencode(tmp_path), b"missing\xff.png")
    with pytest.raises(i2v.ImageInputError) as info:
        tagger.estimate_probabilities([missing])
    assert str(info.value) == f"image at index 0: {tmp_path}/missing\\xff.png: no such file"
    str(info.value).encode("utf-8")  # no surrogate left
    assert info.value.path == os.fsdecode(missing)  # the exact name, for a program
    png = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(png)
    with open(png, "rb") as f:
        temporary = tempfile.NamedTemporaryFile()  # noqa: SIM115 (not an io.IOBase: a wrapper of one)
        cases = ((f, None, "the image"), (io.BytesIO(f.read()), None, "the image"), ([f], 0, "image at index 0"),
                 (temporary, None, "the image"), ([temporary], 0, "image at index 0"))  # fmt: skip
        for given, index, where in cases:
            with pytest.raises(i2v.ImageInputError) as info:
                tagger.estimate_probabilities(given)
            assert str(info.value).startswith(f"{where} is an open file (") and info.value.index == index
            assert str(info.value).endswith("): pass its path, or PIL.Image.open(file)")


def test_a_wrong_type_in_a_list_is_refused_before_any_image_is_computed(tagger, images, monkeypatch):
    import i2v_cli.api as api

    def predict(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(api, "predict", predict)
    with pytest.raises(i2v.ImageInputError) as info:
        tagger.estimate_probabilities([images[0], images[1], 42])
    assert str(info.value) == (
        "image at index 2 is a int: pass a PIL image, an (H, W[, C]) array, a file path, or a list of them "
        "(or an (N, H, W, C) array)"
    )
    with pytest.raises(i2v.ImageInputError, match=r"^image at index 1 is an array of shape \(2, 3, 5\)"):
        tagger.estimate_probabilities([images[0], np.zeros((2, 3, 5))])


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (42, "got a int: pass a PIL image"),
        (None, "got a NoneType: pass a PIL image"),
        (np.zeros((5, 100, 120)), r"a 3-D array is one \(H, W, C\) image with 1, 3 or 4 channels, last, not shape"),
        (np.zeros((1, 1, 5, 5, 3)), "an array of 5 dimensions"),
        (np.zeros(7), "an array of 1 dimensions"),
    ],
)
def test_what_is_not_an_image_is_a_typed_error(tagger, given, message):
    with pytest.raises(i2v.ImageInputError, match=message):
        tagger.estimate_probabilities(given)


# --- parameters (issue 14 point 11) --------------------------------------------------------------------------


@pytest.mark.parametrize("n_tag", [-1, -1539, 2.5, "3", True])
def test_bad_n_tag_is_refused(tagger, images, n_tag):
    with pytest.raises(i2v.ParameterError, match="n_tag must be"):
        tagger.estimate_top_tags(images[:1], n_tag=n_tag)


def test_n_tag_zero_and_numpy_integers(tagger, images):
    assert tagger.estimate_top_tags(images[:1], n_tag=0)[0]["general"] == []
    assert len(tagger.estimate_top_tags(images[:1], n_tag=np.int64(2))[0]["general"]) == 2


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), float("inf"), "0.5", None])
def test_threshold_outside_zero_one_is_refused(tagger, images, threshold):
    with pytest.raises(i2v.ParameterError, match="threshold must be a number from 0 to 1") as info:
        tagger.estimate_plausible_tags(images[:1], threshold=threshold)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_batch_size_below_one_is_refused(tag_weights, tagger, batch_size):
    with pytest.raises(i2v.ParameterError, match="batch_size must be"):
        i2v.load(tag_weights, device="cpu", batch_size=batch_size)
    with pytest.raises(i2v.ParameterError, match="batch_size must be"):
        i2v.Illustration2Vec(tagger.model, batch_size=batch_size)
    with pytest.raises(i2v.ParameterError, match="batch_size must be"):
        tagger.batch_size = batch_size
    assert tagger.batch_size == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"precision": "fp16"}, "fp16 needs a CUDA device"),
        ({"precision": "bf16", "backend": "onnxruntime"}, "onnxruntime computes in fp32"),
        ({"device": "tpu"}, "unknown device 'tpu'"),
        ({"kind": "features"}, "kind must be 'tag', 'feature' or None"),
    ],
)
def test_backend_and_precision_are_checked_at_load(tag_weights, kwargs, message):
    """Refused when the model is loaded, not at its first call."""
    with pytest.raises(i2v.ParameterError, match=message):
        i2v.load(tag_weights, **{"device": "cpu", **kwargs})


def test_backend_is_checked_by_the_constructor(tagger):
    with pytest.raises(i2v.ParameterError, match="unknown backend 'x'"):
        i2v.Illustration2Vec(tagger.model, backend="x")


def test_specific_tags_take_a_name_or_any_iterable_of_names(tagger, images):
    prob = tagger.estimate_probabilities(images[:2])
    expected = [{"solo": float(p[1])} for p in prob]
    assert tagger.estimate_specific_tags(images[:2], "solo") == expected
    assert tagger.estimate_specific_tags(images[:2], (t for t in ["solo"])) == expected
    assert tagger.estimate_specific_tags(images[:2], {"solo": 1}.keys()) == expected
    assert tagger.estimate_specific_tags(images[:2], []) == [{}, {}]
    with pytest.raises(i2v.ParameterError, match="tags must be a tag name or a list of names"):
        tagger.estimate_specific_tags(images[:1], [1, 2])


def test_unknown_specific_tags_suggest_the_closest(tagger, images):
    with pytest.raises(i2v.UnknownTagError) as info:
        tagger.estimate_specific_tags(images[:1], ["long_hair", "solo", "zzzzqqq"])
    assert str(info.value) == ("not in the tag list: 'long_hair' (did you mean 'long hair'?), 'zzzzqqq'")
    assert isinstance(info.value, KeyError)


def test_threshold_rule_is_a_parameter_error(tagger, images):
    with pytest.raises(i2v.ParameterError, match="only threshold_rule='constant'"):
        tagger.estimate_plausible_tags(images[:1], threshold_rule="per_tag")


def test_tag_list_given_to_the_constructor_is_checked(tagger):
    tags = list(tagger.tags)
    tags[5] = tags[0]
    with pytest.raises(i2v.TagListError, match=r"#5 '1girl' \(a duplicate of #0\)"):
        i2v.Illustration2Vec(tagger.model, tags)
    with pytest.raises(i2v.TagListError, match="holds 1538 tags; Illustration2Vec's list has 1539"):
        i2v.Illustration2Vec(tagger.model, tags[1:])


# --- one threshold rule for the API and the CLI (issue 12 point 8) -------------------------------------------


def test_a_score_equal_to_the_threshold_is_kept_as_by_the_cli(tagger, images):
    prob = tagger.estimate_probabilities(images[:1])[0]
    i = int(np.argsort(prob[:512])[-5])  # the fifth best general tag
    score = prob[i]
    for threshold in (float(score), float(np.nextafter(score, np.float32(1)))):
        kept = dict(tagger.estimate_plausible_tags(images[:1], threshold=threshold)[0]["general"])
        cli = select_tags(prob, tagger.tags, Selection.make(threshold))["general"]
        assert kept == cli
        assert (tagger.tags[i] in kept) == (threshold == float(score))
    # A threshold between two float32 values is rounded to float32, as the CLI's is.
    between = (float(score) + float(np.nextafter(score, np.float32(0)))) / 2
    assert np.float32(between) == score or np.float32(between) < score
    assert tagger.tags[i] in dict(tagger.estimate_plausible_tags(images[:1], threshold=between)[0]["general"])
    assert all(type(s) is float for _, s in tagger.estimate_plausible_tags(images[:1])[0]["general"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_model_used_before_a_fork_works_in_the_children(tag_weights, images, backend):
    """multiprocessing's fork after a prediction: the children waited for ever for the OpenMP or ONNX Runtime
    threads that did not come along; now each runs on one thread with a session of its own, and scores the same."""
    import multiprocessing

    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = i2v.load(str(tag_weights), backend=backend)
    want = model.estimate_probabilities(images[:2])
    _INHERITED_BY_CHILDREN[:] = [model, images[:2]]  # inherited by the fork, not pickled
    try:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map_async(_probabilities_in_child, range(2)).get(timeout=60)
    finally:
        _INHERITED_BY_CHILDREN.clear()
    for scores in got:
        np.testing.assert_allclose(scores, want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(model.estimate_probabilities(images[:2]), want)  # the parent is as it was


_INHERITED_BY_CHILDREN: list = []


def _probabilities_in_child(_):
    model, images = _INHERITED_BY_CHILDREN
    return model.estimate_probabilities(images)
