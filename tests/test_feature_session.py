"""The feature network: its trunk in one ONNX Runtime session, ``encode1`` after it in torch with the weight in
oneDNN's layout or in panels (PackedEncode1), held once: the model's own Linear layer is swapped for the packed
one, never copied."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from torch import nn

from i2v_cli.inference import (
    ENCODE1_PANEL,
    OnnxRuntimeNet,
    PackedEncode1,
    onnxruntime_available,
    pack_encode1,
    prepare_for_inference,
)
from i2v_cli.weights import load_model

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")


@pytest.mark.parametrize("out", [ENCODE1_PANEL * 3, 100, 1])
@pytest.mark.parametrize("batch", [1, 8])
def test_packed_encode1_equals_the_linear_layer(out, batch):
    torch.manual_seed(out)
    linear = nn.Linear(1568, out)
    flat = torch.randn(batch, 1568)
    with torch.no_grad():
        want = linear(flat)
        packed = PackedEncode1(linear)
        got = packed(flat)
    assert got.shape == (batch, out) and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.unpacked_weight(), linear.weight.detach(), atol=0, rtol=0)


def test_packing_keeps_one_copy_of_the_weight(feature_weights):
    model, _ = load_model(feature_weights)
    original = weakref.ref(model.encode1.weight)
    pack_encode1(model)
    pack_encode1(model)  # once: a second call changes nothing
    gc.collect()
    assert isinstance(model.encode1, PackedEncode1)
    assert original() is None, "the row-major weight is still held beside the packed one"


@needs_ort
def test_session_runs_the_trunk_and_encode1_follows_in_torch(feature_weights, golden, tmp_path):
    reference, _ = load_model(feature_weights)
    model, _ = load_model(feature_weights)
    x = torch.from_numpy(np.load(golden / "expected" / "inputs.npz")["inputs"][:4])
    net = prepare_for_inference(model, cache_dir=tmp_path)
    assert isinstance(net, OnnxRuntimeNet) and net.head is model.encode1
    assert isinstance(model.encode1, PackedEncode1)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x), atol=1e-4, rtol=0)
    (exported,) = (tmp_path / "onnx").glob("feature-*.onnx")
    assert exported.stat().st_size < reference.encode1.weight.numel() * 4 / 2  # the trunk, not the matrix
    with torch.no_grad():
        model.encode1.packed.mul_(-1)  # the net computes with the model's (packed) tensor as it is now
        reference.encode1.weight.mul_(-1)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), reference(x), atol=1e-4, rtol=0)


def test_packed_encode1_stands_in_for_the_linear_layer():
    """An empty batch and a 1-D input raised; `.weight` was an AttributeError and the state dict held `packed`, so
    code written against nn.Linear (the API's `model`) broke once a predictor had been made."""
    torch.manual_seed(0)
    linear = nn.Linear(40, 70)
    packed = PackedEncode1(linear)
    with torch.no_grad():
        assert packed(torch.randn(0, 40)).shape == (0, 70)
        one = torch.randn(40)
        torch.testing.assert_close(packed(one), linear(one), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed.weight, linear.weight, atol=0, rtol=0)
    state = packed.state_dict()
    assert set(state) == {"weight", "bias"}
    torch.testing.assert_close(state["weight"], linear.weight.detach(), atol=0, rtol=0)
    other = nn.Linear(40, 70)
    packed.load_state_dict(other.state_dict())  # loads as nn.Linear's state dict does, repacked
    with torch.no_grad():
        x = torch.randn(3, 40)
        torch.testing.assert_close(packed(x), other(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        packed.load_state_dict(nn.Linear(40, 71).state_dict())


needs_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")),
    reason="this torch build has no oneDNN linear operators (the panels layout is used)",
)


@needs_onednn
def test_encode1_uses_onednn_where_torch_has_it():
    """The oneDNN layout reads the 800 MB weight about twice as fast as the panels at batch 8 (bench/encode1.py)."""
    packed = PackedEncode1(nn.Linear(300, 70))
    assert packed.layout == "onednn" and packed.packed.layout == torch._mkldnn


@pytest.mark.parametrize("layout", ["onednn", "panels"])
def test_both_layouts_compute_the_linear_layer(monkeypatch, layout):
    if layout == "panels":
        monkeypatch.setattr("i2v_cli.inference._onednn_encode1", lambda weight: None)
    elif not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    torch.manual_seed(1)
    linear = nn.Linear(300, 70)
    packed = PackedEncode1(linear)
    assert packed.layout == layout
    with torch.no_grad():
        for shape in [(8, 300), (1, 300), (300,), (2, 3, 300)]:
            x = torch.randn(shape)
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
        assert packed(torch.randn(0, 300)).shape == (0, 70)


@needs_onednn
def test_a_onednn_operator_that_disagrees_is_not_used(monkeypatch):
    """A private operator is trusted only once seen to agree on a probe; otherwise the panels are used."""
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, b, *rest: real(x, w, b, *rest) * 1.01)
    assert PackedEncode1(nn.Linear(300, 70)).layout == "panels"
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: (_ for _ in ()).throw(RuntimeError("no")))
    assert PackedEncode1(nn.Linear(300, 70)).layout == "panels"


@needs_onednn
def test_onednn_layout_copies_pickles_and_moves():
    """oneDNN's opaque tensor has no storage: deepcopy and torch.save failed on it, and .to() of another dtype or
    device would have sent it nowhere; the plain weight travels instead and is packed again where it lands."""
    import copy
    import io

    torch.manual_seed(2)
    linear = nn.Linear(300, 70)
    packed = PackedEncode1(linear)
    x = torch.randn(4, 300)
    with torch.no_grad():
        want = linear(x)
        for other in (copy.deepcopy(packed), _saved_and_loaded(packed, io.BytesIO())):
            assert other.layout == "onednn"
            torch.testing.assert_close(other(x), want, atol=1e-5, rtol=1e-5)
        assert packed.to("cpu").share_memory().layout == "onednn"  # where it already lives: left as it is
        wide = copy.deepcopy(packed).double()
        assert wide.layout == "panels" and wide.packed.dtype == torch.float64
        torch.testing.assert_close(wide(x.double()), want.double(), atol=1e-5, rtol=1e-5)
        back = wide.float()  # back where oneDNN's layout serves it: packed so again, not left on the slower panels
        assert back.layout == "onednn"
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed(x), want, atol=1e-5, rtol=1e-5)  # the original untouched


def _saved_and_loaded(module: nn.Module, buffer) -> nn.Module:
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)
