"""The Python API: the original release's calls and return shapes, on the golden models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import i2v_cli as i2v


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
