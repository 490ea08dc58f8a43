"""A one-batch `i2v tag` on a recorded ONNX export runs without torch, and writes what the torch path writes
(issue 15.2): the rule that picks the path, the NumPy reader against the DataLoader's, and the features of
`i2v tag` on the torch-free path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import crashing
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from i2v_cli.batches import read_batches
from i2v_cli.cli import cli
from i2v_cli.cli.common import runs_without_torch
from i2v_cli.inference import onnxruntime_available

needs_ort = pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")

#: Runs the CLI in a fresh interpreter and prints whether torch was imported (and the exit status).
_CHILD = (
    "import sys\nfrom i2v_cli.cli import cli\ncode = 0\n"
    "try:\n    cli(sys.argv[1:])\nexcept SystemExit as exc:\n    code = exc.code or 0\n"
    "print('torch' in sys.modules, code)"
)


def _child(home: Path, *args: str) -> tuple[bool, int]:
    env = {**os.environ, "I2V_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, check=True, capture_output=True, text=True)
    torch, code = done.stdout.split()
    return torch == "True", int(code)


@pytest.fixture
def inputs(tmp_path: Path, golden_order: list[Path]) -> list[str]:
    """The golden images (resized ones, RGBA, L, P, JPEG) and a broken file, in one batch."""
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return [*map(str, golden_order), str(broken)]


@needs_ort
def test_a_one_batch_run_imports_no_torch_and_writes_what_the_torch_path_writes(tmp_path, tag_weights, inputs):
    home, base = tmp_path / "home", ["tag", *inputs, "-w", str(tag_weights), "-t", "0"]
    assert len(inputs) <= 16
    assert _child(home, *base, "-o", str(tmp_path / "first.jsonl")) == (True, 1)  # reads and exports the weights
    assert _child(home, *base, "-o", str(tmp_path / "free.jsonl")) == (False, 1)  # the export is recorded now
    assert _child(home, *base, "-o", str(tmp_path / "torch.jsonl"), "-j", "1") == (True, 1)  # workers: torch path
    free = (tmp_path / "free.jsonl").read_bytes()
    assert free == (tmp_path / "torch.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()
    records = [json.loads(line) for line in free.splitlines()]
    assert [r["path"] for r in records] == inputs
    assert ["error" in r for r in records] == [False] * (len(inputs) - 1) + [True]


@needs_ort
@pytest.mark.parametrize(
    "more",
    [["-j", "2"], ["--precision", "bf16"], ["--backend", "torch"], ["--device", "cpu", "-b", "4"]],
    ids=["workers", "bf16", "torch-backend", "two-batches"],
)
def test_other_runs_take_the_torch_path(tmp_path, tag_weights, inputs, more):
    home, base = tmp_path / "home", ["tag", *inputs, "-w", str(tag_weights), "-o", str(tmp_path / "a.jsonl")]
    assert _child(home, *base) == (True, 1)
    assert _child(home, *base, *more) == (True, 1)


@pytest.mark.parametrize(
    ("device", "backend", "precision", "workers", "images", "batch", "free"),
    [
        ("auto", "auto", "fp32", None, 1, 16, True),
        ("cpu", "onnxruntime", "fp32", 0, 16, 16, True),
        ("cpu", "auto", "fp32", 1, 1, 16, False),  # decoding workers asked for
        ("cpu", "auto", "fp32", None, 17, 16, False),  # two batches: the DataLoader overlaps them
        ("cpu", "auto", "fp32", None, 0, 16, False),
        ("cpu", "torch", "fp32", None, 1, 16, False),
        ("cpu", "auto", "bf16", None, 1, 16, False),
        ("cpu", "auto", "int8", None, 1, 16, False),
        ("cuda", "auto", "fp32", None, 1, 16, False),
    ],
)
def test_the_rule(device, backend, precision, workers, images, batch, free):
    assert runs_without_torch(device, backend, precision, workers, images, batch) is (free and onnxruntime_available())


# --------------------------------------------------------------------------------------------------------------
# The NumPy reader decodes exactly as the DataLoader's (there is one resize, in NumPy; torch only wraps it)


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 700), st.integers(1, 700)), min_size=1, max_size=3),
    mode=st.sampled_from(["RGB", "L", "RGBA"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_the_numpy_reader_equals_the_dataloader(tmp_path_factory, sizes, mode, seed):
    import torch

    from i2v_cli.data import iter_batches
    from i2v_cli.transform import ArrayPixels, resize_array, resize_pixels

    folder = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        pixels = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels, mode).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
        rgb = pixels[:, :, :3] if mode != "L" else np.repeat(pixels, 3, axis=2)
        want = resize_pixels(ArrayPixels(rgb))
        assert isinstance(want, torch.Tensor)
        np.testing.assert_array_equal(resize_array(ArrayPixels(rgb)), want.numpy())
    (free,) = read_batches(paths, batch_size=len(paths))
    (loaded,) = iter_batches(paths, batch_size=len(paths), workers=0)
    assert free.ok == loaded.ok == list(range(len(paths))) and free.errors == loaded.errors == {}
    assert isinstance(free.inputs, np.ndarray) and free.inputs.dtype == np.float32
    np.testing.assert_array_equal(free.inputs, loaded.inputs.numpy())


# --------------------------------------------------------------------------------------------------------------
# The features of `i2v tag` on the torch-free path (in this process: the DataLoader is made to fail if used)


@pytest.fixture
def torch_free(monkeypatch, tmp_path, tag_weights, inputs):
    """A home whose export of the tag weights is recorded, and a DataLoader that fails the test if used."""
    home = tmp_path / "home"
    _child(home, "tag", inputs[0], "-w", str(tag_weights), "-o", str(tmp_path / "warm.jsonl"))
    import i2v_cli.data

    monkeypatch.setattr(i2v_cli.data, "iter_batches", lambda *a, **k: pytest.fail("the torch path ran"))
    monkeypatch.setenv("I2V_HOME", str(home))
    return home


def _tag(*args: object):
    return CliRunner().invoke(cli, ["tag", *map(str, args)])


@needs_ort
def test_formats_thresholds_resume_and_errors_on_the_torch_free_path(torch_free, tmp_path, tag_weights, inputs):
    out = tmp_path / "tags.jsonl"
    result = _tag(*inputs[:3], "-w", tag_weights, "-o", out, "--general-threshold", "0.3", "-k", "3")
    assert result.exit_code == 0, result.output
    first = out.read_text().splitlines()
    assert [json.loads(line)["path"] for line in first] == inputs[:3]
    result = _tag(*inputs, "-w", tag_weights, "-o", out, "--general-threshold", "0.3", "-k", "3", "--resume")
    assert result.exit_code == 1
    assert f"tagged {len(inputs) - 4} of {len(inputs) - 3} images, 3 already in" in result.stderr
    assert "broken.png" in result.stderr
    lines = out.read_text().splitlines()
    assert lines[:3] == first
    records = [json.loads(line) for line in lines]
    assert [r["path"] for r in records] == inputs
    assert "error" in records[-1] and all("error" not in r for r in records[:-1])
    for record in records[:-1]:
        assert 0 < len(record["general"]) <= 3 and min(record["general"].values()) >= 0.3
        assert len(record["rating"]) == 3


@needs_ort
def test_captions_on_the_torch_free_path(torch_free, tmp_path, tag_weights, golden_order):
    folder = tmp_path / "set"
    folder.mkdir()
    for p in golden_order[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    result = _tag(folder, "-w", tag_weights, "--captions", "-t", "0.2", "--rating-tag")
    assert result.exit_code == 0, result.output
    captions = sorted(folder.glob("*.txt"))
    assert [c.stem for c in captions] == sorted(p.stem for p in golden_order[:3])
    assert all(c.read_text().strip().split(", ")[-1] in ("safe", "questionable", "explicit") for c in captions)


# --------------------------------------------------------------------------------------------------------------
# Decoding in a child process: an image that kills its decoder costs only that image


def _crash_on(pattern: str):
    """load_network_input, killing its own process for paths containing ``pattern`` (see conftest.crashing)."""
    import i2v_cli.transform

    return crashing(i2v_cli.transform.load_network_input, pattern)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork carrying the monkeypatch into the child")
def test_an_image_that_kills_its_decoding_process_becomes_its_error(monkeypatch, golden_order):
    paths = [str(golden_order[3]), "/nonexistent/0-BOOM.png", str(golden_order[4]), str(golden_order[0])]
    here = list(read_batches(paths, batch_size=3))
    monkeypatch.setattr("i2v_cli.transform.load_network_input", _crash_on("BOOM"))
    isolated = list(read_batches(paths, batch_size=3, isolate=True))
    assert [b.ok for b in isolated] == [[0, 2], [3]]
    assert isolated[0].errors == {1: "/nonexistent/0-BOOM.png: the image decoder crashed on this file (its worker "
                                  "process died)"}  # fmt: skip
    assert here[0].errors == {1: "/nonexistent/0-BOOM.png: no such file"}  # in this process: it is missing
    np.testing.assert_array_equal(isolated[0].inputs, here[0].inputs)
    np.testing.assert_array_equal(isolated[1].inputs, here[1].inputs)


def test_a_bug_in_the_decoding_process_is_raised_not_recorded(monkeypatch, golden_order):
    def broken(path):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("i2v_cli.transform.load_network_input", broken)
    with pytest.raises(RuntimeError, match="ZeroDivisionError: a bug"):
        list(read_batches([str(golden_order[0])], isolate=True))


@needs_ort
@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork carrying the monkeypatch into the child")
def test_the_default_torch_free_run_survives_a_decoder_crash(torch_free, monkeypatch, tmp_path, tag_weights, inputs):
    boom = tmp_path / "1-BOOM.png"
    boom.write_bytes(Path(inputs[0]).read_bytes())
    monkeypatch.setattr("i2v_cli.transform.load_network_input", _crash_on("BOOM"))
    out = tmp_path / "out.jsonl"
    result = _tag(inputs[0], boom, inputs[1], "-w", tag_weights, "-o", out)
    assert result.exit_code == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [inputs[0], str(boom), inputs[1]]
    assert "decoder crashed" in records[1]["error"] and "error" not in records[0] and "error" not in records[2]


_SLOW_CHILD = (
    "import sys, time\nimport i2v_cli.transform as t\nfrom i2v_cli.cli import main\nreal = t.load_network_input\n"
    "def slow(path):\n    open(marker, 'w').close()\n    time.sleep(60)\n    return real(path)\n"
    "t.load_network_input = slow\nmarker = sys.argv.pop(1)\nmain()"
)


@needs_ort
@pytest.mark.parametrize("workers", [[], ["-j", "0"]], ids=["child", "here"])
def test_sigterm_while_decoding_stops_a_torch_free_run_at_once(tmp_path, tag_weights, inputs, workers):
    home, marker, out = tmp_path / "home", tmp_path / "decoding", tmp_path / "out.jsonl"
    _child(home, "tag", inputs[0], "-w", str(tag_weights), "-o", str(tmp_path / "warm.jsonl"))
    env = {**os.environ, "I2V_HOME": str(home)}
    args = ["tag", inputs[0], "-w", str(tag_weights), "-o", str(out), *workers]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CHILD, str(marker), *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().strip().splitlines()[-1] == "i2v: terminated (SIGTERM)"
    assert out.read_bytes() == b""  # what was done is kept: nothing, and no temporary file is left
    hidden = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
    assert hidden == {".warm.jsonl.i2v.json", ".out.jsonl.i2v.json"}  # the job files, no temporary file
