"""A run's start-up: what a one-image `i2v tag` with a cached ONNX export does not do (read the weights, import
the ONNX exporter, optimise the graph again), and that skipping it changes no record (issue 15.2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.inference import OnnxRuntimeNet, onnxruntime_available, prepare_for_inference
from i2v_cli.weights import load_model

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")


def _tag(home: Path, weights: Path, image: Path, out: Path, *more: str) -> list[dict]:
    result = CliRunner().invoke(cli, ["tag", str(image), "-w", str(weights), "-o", str(out), "-t", "0", *more],
                                env={"I2V_HOME": str(home)})  # fmt: skip
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture
def image(golden_order: list[Path]) -> Path:
    return golden_order[0]


def test_a_cached_export_is_run_without_reading_the_weights(monkeypatch, tmp_path, tag_weights, image):
    weights = tmp_path / "tag.safetensors"
    weights.write_bytes(tag_weights.read_bytes())
    first = _tag(tmp_path / "home", weights, image, tmp_path / "a.jsonl")
    import i2v_cli.weights

    def no_read(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(i2v_cli.weights, "load_model", no_read)
    assert _tag(tmp_path / "home", weights, image, tmp_path / "b.jsonl") == first


def test_changed_weights_are_read_again(monkeypatch, tmp_path, tag_weights, image):
    weights = tmp_path / "tag.safetensors"
    weights.write_bytes(tag_weights.read_bytes())
    first = _tag(tmp_path / "home", weights, image, tmp_path / "a.jsonl")
    # Other weights in the same file, with the same size (and a modification time set back as it was): the change
    # time still differs, so the record of the old export is not used.
    model, info = load_model(tag_weights)
    with __import__("torch").no_grad():
        model.conv6_4.bias.add_(1.0)
    from i2v_cli.weights import save_safetensors

    st = weights.stat()
    save_safetensors(model.state_dict(), weights, info.to_metadata())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size
    import i2v_cli.weights

    calls = []
    real = i2v_cli.weights.load_model
    monkeypatch.setattr(i2v_cli.weights, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    second = _tag(tmp_path / "home", weights, image, tmp_path / "b.jsonl")
    assert len(calls) == 1
    assert second != first
    assert second == _tag(tmp_path / "fresh", weights, image, tmp_path / "c.jsonl")  # as a run with no cache


def test_the_optimised_graph_is_kept_and_computes_the_same(tmp_path, tag_weights, golden_order):
    from i2v_cli.transform import load_and_preprocess

    model, _ = load_model(tag_weights)
    x = __import__("torch").stack([load_and_preprocess(p) for p in golden_order[:4]])
    first = prepare_for_inference(model, cache_dir=tmp_path)
    (graph,) = (tmp_path / "onnx-ort").glob("tag-*.onnx")
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [f"{first.export.stem}.onnx"]
    second = OnnxRuntimeNet(model, tmp_path)
    assert [p.name for p in (tmp_path / "onnx-ort").glob("*.onnx")] == [graph.name]
    np.testing.assert_array_equal(second(x).numpy(), first(x).numpy())
    graph.write_bytes(b"damaged")  # a damaged graph is made again, quietly: it is a cache of a cache
    third = OnnxRuntimeNet(model, tmp_path)
    assert third.notes == [] and graph.stat().st_size > 1000
    np.testing.assert_array_equal(third(x).numpy(), first(x).numpy())


def test_a_cached_run_imports_no_onnx_exporter(tmp_path, tag_weights, image):
    """The exporter (``onnx``, about 0.1 s) is needed only to export; a run on a cached export leaves it alone."""
    env = {**os.environ, "I2V_HOME": str(tmp_path / "home")}
    args = ["tag", str(image), "-w", str(tag_weights), "-o", str(tmp_path / "out.jsonl")]
    code = (
        "import sys\nfrom i2v_cli.cli import cli\n"
        f"try:\n    cli({args!r})\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('onnx' in sys.modules, 'i2v_cli.model' in sys.modules and 'safetensors' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)  # exports, records
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    assert done.stdout.split() == ["False", "False"]


def test_a_wrong_thread_guess_reopens_the_session_with_torchs_count(monkeypatch, tmp_path, tag_weights, image):
    import torch

    import i2v_cli.cli.common as common
    import i2v_cli.weights

    first = _tag(tmp_path / "home", tag_weights, image, tmp_path / "a.jsonl")
    monkeypatch.setattr(common, "default_threads", lambda: torch.get_num_threads() + 3)
    monkeypatch.setattr(i2v_cli.weights, "load_model", lambda *a, **k: pytest.fail("the weights were read"))
    made = []
    real = OnnxRuntimeNet.from_session.__func__

    def spy(cls, session, export):
        made.append(session)
        return real(cls, session, export)

    monkeypatch.setattr(OnnxRuntimeNet, "from_session", classmethod(spy))
    # -j 1: decoding workers take the torch path (a run of one batch in this process goes without torch)
    assert _tag(tmp_path / "home", tag_weights, image, tmp_path / "b.jsonl", "-j", "1") == first
    assert [s.get_session_options().intra_op_num_threads for s in made] == [torch.get_num_threads()]
