"""The transform (i2v_cli.transform): one rule for arrays and tensors, PIL images decoded as files are, and
memory bounded by the image whatever its shape."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from i2v_cli.config import INPUT_SIZE
from i2v_cli.decode import RGBPixels, image_to_array
from i2v_cli.errors import I2VError, ImageArrayError
from i2v_cli.transform import ArrayPixels, preprocess, resize_like_caffe, resize_pixels

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, (37, 53, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------
# Arrays and tensors: one rule (issue 14.10)


def test_uint8_and_in_range_floats_and_ints_are_taken_as_they_are():
    want = preprocess(PICTURE)
    assert torch.equal(preprocess(torch.from_numpy(PICTURE)), want)
    assert torch.equal(preprocess(PICTURE.astype(np.int64)), want)
    torch.testing.assert_close(preprocess(PICTURE.astype(np.float32)), want, rtol=0, atol=1e-4)
    torch.testing.assert_close(preprocess(torch.from_numpy(PICTURE).to(torch.bfloat16)), want, rtol=0, atol=1e-4)


def test_uint16_is_scaled_as_a_sixteen_bit_image_is():
    grey16 = RNG.integers(0, 65536, (40, 30), dtype=np.uint16)
    as_image = Image.fromarray(grey16)
    assert as_image.mode.startswith("I;16")
    assert torch.equal(preprocess(grey16), preprocess(as_image))
    assert torch.equal(preprocess(grey16), preprocess((grey16 >> 8).astype(np.uint8)))
    rgb16 = PICTURE.astype(np.uint16) * 257  # 0-255 spread over 0-65535
    assert torch.equal(preprocess(rgb16), preprocess(PICTURE))


@pytest.mark.parametrize(
    ("array", "words"),
    [
        (PICTURE / 255.0, "all lie within 0-1 (0 to 1): multiply by 255"),
        (PICTURE / 127.5 - 1.0, "must lie within 0-255, found -1 to 1 (normalised values?"),
        (PICTURE * 2.0, "must lie within 0-255, found 0 to 510"),
        (PICTURE.astype(np.int32) - 1, "int32 pixels must lie within 0-255, found -1 to 254"),
        (np.full((4, 4, 3), np.nan), "NaN or infinite"),
        (PICTURE.astype(bool), "expected uint8, uint16 or float pixels, got bool"),
        (PICTURE.astype(np.complex64), "got complex64"),
        (np.zeros((3, 20, 20), np.uint8), "channels first? use .permute(1, 2, 0)"),
        (np.zeros((0, 4), np.uint8), "empty image"),
    ],
    ids=["unit-float", "normalised", "over-255", "negative-int", "nan", "bool", "complex", "chw", "empty"],
)
def test_arrays_out_of_the_rule_are_refused_saying_what_to_pass(array, words):
    with pytest.raises(ImageArrayError) as info:
        preprocess(array)
    assert words in str(info.value)
    assert isinstance(info.value, I2VError) and isinstance(info.value, ValueError)


def test_float_image_mode_keeps_its_file_convention():
    """A float PIL image (a file's data) in 0-1 is scaled, as decoding a float TIFF does."""
    unit = Image.fromarray((PICTURE[:, :, 0] / 255.0).astype(np.float32))
    assert unit.mode == "F"
    torch.testing.assert_close(preprocess(unit), preprocess(PICTURE[:, :, 0]), rtol=0, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# Arrays and decoded images agree exactly


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), lo=st.integers(0, 255), seed=st.integers(0, 2**32 - 1))
def test_a_decoded_image_and_its_array_give_the_same_input(h, w, lo, seed):
    """The blocks of an RGB image and of its uint8 array go through the same arithmetic: bit-equal."""
    arr = np.random.default_rng(seed).integers(lo, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    assert torch.equal(resize_pixels(RGBPixels(img)), resize_pixels(ArrayPixels(arr)))
    assert torch.equal(preprocess(img), preprocess(arr))


@settings(max_examples=30, deadline=None)
@given(
    h=st.sampled_from([1, 2, 7, INPUT_SIZE, 225, 480]),
    w=st.sampled_from([1, 3, INPUT_SIZE, 300, 640]),
    uniform=st.booleans(),
    as_float=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_network_input_equals_the_resize_then_the_normalisation(h, w, uniform, as_float, seed):
    """load_network_input lays the resize's result out once, in its own memory order: bit-equal to resizing to
    (H, W, 3) and normalising that, on every path of the resize (either side the identity, uniform, floats)."""
    from i2v_cli import transform

    rng = np.random.default_rng(seed)
    arr = np.full((h, w, 3), 77, np.uint8) if uniform else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    pixels = ArrayPixels(arr.astype(np.float32) * 0.75 + 3.0 if as_float else arr)
    rgb = transform.resize_array(pixels)
    assert rgb.dtype == np.float32 and rgb.flags.c_contiguous and rgb.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    fused = transform._network_input(pixels)
    assert fused.dtype == np.float32 and fused.flags.c_contiguous
    np.testing.assert_array_equal(fused, transform.network_input_array(rgb))


def test_the_network_input_of_a_very_wide_image_equals_the_two_steps():
    from i2v_cli import transform

    arr = RNG.integers(0, 256, (5, 13_000, 3), dtype=np.uint8)
    assert INPUT_SIZE * 13_000 * 3 * 4 > transform._MAX_INTERMEDIATE  # the W-first path
    pixels = ArrayPixels(arr)
    np.testing.assert_array_equal(
        transform._network_input(pixels), transform.network_input_array(transform.resize_array(pixels))
    )


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1", "I;16", "I", "F", "YCbCr", "HSV", "La"])
def test_blocks_equal_the_whole_image_for_every_mode(mode):
    base = Image.fromarray(RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F"):
        grey = np.asarray(base.convert("L")).astype(np.float64)
        img = Image.fromarray((grey * 257).astype(np.uint16) if mode == "I;16" else grey.astype(np.int32) * 3)
        img = img if mode != "F" else Image.fromarray((grey / 255).astype(np.float32))
    elif mode == "La":
        img = base.convert("LA").convert("La")
    else:
        img = base.convert(mode)
    assert img.mode == mode
    pixels = RGBPixels(img)
    whole = image_to_array(img)
    np.testing.assert_array_equal(np.concatenate([pixels.rows(0, 1), pixels.rows(1, 33), pixels.rows(33, 70)]), whole)


# --------------------------------------------------------------------------------------------------------
# Memory bounded by the image (issue 13.4); numpy's peak, measured by tracemalloc


def _numpy_peak(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [(1, 60_000, 3), (60_000, 1, 3), (3, 60_000, 3)], ids=["wide", "tall", "strip"])
def test_extreme_aspect_ratios_stay_small(shape):
    """A 1 x 60,000 image took 224 x 180,000 floats (160 MB) in the first pass; now a few MB."""
    arr = RNG.integers(0, 256, shape, dtype=np.uint8)
    peak = _numpy_peak(lambda: resize_like_caffe(arr))
    assert peak < 24, f"{peak:.0f} MB"


def test_a_pil_image_is_never_copied_whole():
    """np.asarray(PIL image) made two copies of its pixels; the resize reads strips instead."""
    img = Image.new("RGB", (4000, 3000), (10, 20, 30))
    img.paste((200, 100, 0), (0, 0, 2000, 1500))
    whole_copy = 4000 * 3000 * 3 / 1e6  # 36 MB
    peak = _numpy_peak(lambda: preprocess(img))
    assert peak < whole_copy * 0.75, f"{peak:.0f} MB against a copy of {whole_copy:.0f} MB"


def test_wide_images_resize_along_width_first_with_the_same_result():
    """Past the (size x W) limit the passes swap order: the result agrees with the other order."""
    from i2v_cli import transform

    arr = RNG.integers(7, 250, (40, 13_000, 3), dtype=np.uint8)
    assert INPUT_SIZE * 13_000 * 3 * 4 > transform._MAX_INTERMEDIATE
    for pixels in (ArrayPixels(arr), ArrayPixels(arr.astype(np.float32) + 0.5)):
        wide_first = transform.resize_pixels(pixels)
        assert wide_first.shape == (INPUT_SIZE, INPUT_SIZE, 3)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(transform, "_MAX_INTERMEDIATE", 1 << 40)  # along H first
            torch.testing.assert_close(transform.resize_pixels(pixels), wide_first, rtol=0, atol=1e-4)
