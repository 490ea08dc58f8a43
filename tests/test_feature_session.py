"""The feature network in one ONNX Runtime session that reads encode1's weight from the model, never a copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from i2v_cli.inference import OnnxRuntimeNet, onnxruntime_available, prepare_for_inference
from i2v_cli.weights import load_model

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")


def test_session_reads_encode1_from_the_model_in_place(feature_weights, golden, tmp_path):
    model, _ = load_model(feature_weights)
    x = torch.from_numpy(np.load(golden / "expected" / "inputs.npz")["inputs"][:4])
    net = prepare_for_inference(model, cache_dir=tmp_path)
    assert isinstance(net, OnnxRuntimeNet)
    with torch.inference_mode():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=0)
    weight = model.encode1.weight
    assert np.shares_memory(net.feeds["encode1_weight"], weight.detach().numpy())  # held once
    (exported,) = (tmp_path / "onnx").glob("feature-*.onnx")
    assert exported.stat().st_size < weight.numel() * 4 / 2  # the file has the trunk, not the matrix
    with torch.no_grad():
        weight.mul_(-1)  # the session computes with the model's tensor as it is now
    with torch.inference_mode():
        torch.testing.assert_close(net(x), model(x), atol=1e-4, rtol=0)
