"""Fast inference paths (packed oneDNN, ONNX Runtime, autocast): same results as eager, or the agreement promised."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from i2v_cli.errors import I2VError
from i2v_cli.inference import (
    OnnxRuntimeNet,
    PackedCPUNet,
    TorchNet,
    check_precision,
    onnxruntime_available,
    prepare_for_inference,
    resolve_backend,
    weights_digest,
)
from i2v_cli.runner import run_model
from i2v_cli.weights import load_model

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def inputs(golden) -> torch.Tensor:
    """The golden preprocessed batch (12 images)."""
    return torch.from_numpy(np.load(golden / "expected" / "inputs.npz")["inputs"])


@pytest.fixture(scope="module", params=["tag", "feature"])
def loaded(request, tag_weights, feature_weights):
    """A golden model (tag or feature) and its eager fp32 outputs are computed by the caller."""
    model, _ = load_model(tag_weights if request.param == "tag" else feature_weights)
    return model


def _eager(model, x):
    with torch.inference_mode():
        return model(x)


def test_packed_cpu_net_equals_eager(loaded, inputs):
    net = prepare_for_inference(loaded, backend="torch")
    assert isinstance(net, PackedCPUNet)  # this torch build has oneDNN: the fast path is the one taken
    with torch.inference_mode():
        got = net(inputs)
    torch.testing.assert_close(got, _eager(loaded, inputs), atol=1e-4, rtol=0)


@needs_ort
def test_onnxruntime_equals_eager_and_is_cached(loaded, inputs, tmp_path):
    net = prepare_for_inference(loaded, backend="onnxruntime", cache_dir=tmp_path)
    assert isinstance(net, OnnxRuntimeNet)
    torch.testing.assert_close(net(inputs), _eager(loaded, inputs), atol=1e-4, rtol=0)
    files = list((tmp_path / "onnx").glob("*.onnx"))
    assert len(files) == 1 and files[0].name.startswith(loaded.arch.kind)
    if loaded.arch.kind == "feature":  # the session runs the trunk: encode1's weight is not copied into it
        assert files[0].stat().st_size < loaded.encode1.weight.numel() * 4
    mtime = files[0].stat().st_mtime_ns
    OnnxRuntimeNet(loaded, tmp_path)  # a second session reuses the export
    assert [f.stat().st_mtime_ns for f in (tmp_path / "onnx").glob("*.onnx")] == [mtime]


@needs_ort
def test_onnxruntime_without_a_writable_cache_exports_in_memory(loaded, inputs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    net = OnnxRuntimeNet(loaded, blocker)
    torch.testing.assert_close(net(inputs[:2]), _eager(loaded, inputs[:2]), atol=1e-4, rtol=0)


def test_bf16_agrees_with_fp32_at_half(tag_weights, inputs):
    model, _ = load_model(tag_weights)
    want = _eager(model, inputs)
    with torch.inference_mode():
        got = prepare_for_inference(model, precision="bf16")(inputs)
    assert got.dtype == torch.float32
    assert ((got > 0.5) == (want > 0.5)).float().mean().item() >= 0.995
    assert (got - want).abs().max().item() < 0.1


def test_fp16_on_cpu_is_a_clear_error(tag_weights):
    model, _ = load_model(tag_weights)
    with pytest.raises(I2VError, match="fp16 needs a CUDA device"):
        prepare_for_inference(model, precision="fp16")
    with pytest.raises(I2VError, match="unknown precision"):
        check_precision("fp8", CPU)


def test_backend_choice():
    assert resolve_backend("torch", CPU, "fp32") == "torch"
    assert resolve_backend("auto", CPU, "bf16") == "torch"
    assert resolve_backend("auto", CPU, "fp32") == ("onnxruntime" if onnxruntime_available() else "torch")
    with pytest.raises(I2VError, match="computes in fp32"):
        resolve_backend("onnxruntime", CPU, "bf16")
    with pytest.raises(I2VError, match="unknown backend"):
        resolve_backend("tensorrt", CPU, "fp32")


def test_weights_digest_follows_the_values(tag_weights):
    a, _ = load_model(tag_weights)
    b, _ = load_model(tag_weights)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.conv6_4.bias[0] += 1
    assert weights_digest(a) != weights_digest(b)


@pytest.mark.parametrize("backend", ["torch", pytest.param("onnxruntime", marks=needs_ort)])
def test_golden_scores_with_each_backend(golden, golden_order, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("I2V_HOME", str(tmp_path))
    model, _ = load_model(golden / "models" / "tag_v2.caffemodel", kind="tag")
    paths = [str(p) for p in golden_order]
    got = np.stack([r.output for b in run_model(model, paths, batch_size=5, backend=backend) for r in b])
    expected = np.load(golden / "expected" / "tag_v2.npy")
    np.testing.assert_allclose(got[:3], expected[:3], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got[3:], expected[3:], atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_autocast_agrees_with_fp32(tag_weights, inputs, precision):
    model, _ = load_model(tag_weights, device="cuda")
    x = inputs.cuda()
    want = _eager(model, x)
    net = prepare_for_inference(model, precision=precision)
    assert isinstance(net, TorchNet)
    with torch.inference_mode():
        got = net(x)
    assert ((got > 0.5) == (want > 0.5)).float().mean().item() >= 0.995


def test_cli_precision_and_backend(golden, golden_order, tag_weights, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from i2v_cli.cli import cli

    monkeypatch.setenv("I2V_HOME", str(tmp_path))
    runner = CliRunner()
    images = [str(p) for p in golden_order[:4]]
    base = ["tag", *images, "-w", str(tag_weights), "--workers", "0", "--threshold", "0", "-f", "jsonl"]
    fp16 = runner.invoke(cli, [*base, "--device", "cpu", "--precision", "fp16"])
    assert fp16.exit_code == 2
    assert "fp16 needs a CUDA device" in fp16.output and len(fp16.output.strip().splitlines()) == 1
    runs = {}
    for extra in (["--backend", "torch"], ["--precision", "bf16"]):
        result = runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        runs[extra[1]] = [json.loads(line) for line in result.stdout.splitlines()]
    for a, b in zip(runs["torch"], runs["bf16"], strict=True):
        assert a["path"] == b["path"]
        assert abs(a["rating"]["safe"] - b["rating"]["safe"]) < 0.1
