"""The torch-free path of `i2v tag` (one batch on a recorded export) under hostile conditions: what broke there
and was fixed, each with the test that failed before the fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from i2v_cli.cli import cli
from i2v_cli.inference import onnxruntime_available
from i2v_cli.ortcache import recall_export


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: no psutil here)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_the_decoding_child_of_a_killed_run_exits_by_itself(tmp_path):
    """A run killed outright (SIGKILL, the out-of-memory killer) while its child decodes: the child must not wait
    forever to hand over a batch nobody will read, holding the run's files (its output's lock) open. It held its
    own copy of the pipe's reading end, so its send never failed: it blocked for ever."""
    image = tmp_path / "tall.png"
    Image.new("RGB", (1, 200_000), (200, 10, 30)).save(image)
    script = (
        "import sys\nfrom i2v_cli.batches import read_batches\nprint('go', flush=True)\n"
        f"list(read_batches({[str(image)] * 4!r}, isolate=True))\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    children: list[int] = []
    try:
        assert parent.stdout is not None and parent.stdout.readline() == b"go\n"
        deadline = time.monotonic() + 30
        while not (children := _children(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert children, "the decoding child never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, children)), "the decoding child outlived its run"
    finally:
        parent.kill()
        parent.wait()
        for pid in children:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not onnxruntime_available(), reason="onnxruntime is not installed (the onnx extra)")
@pytest.mark.parametrize("damage", ["no-sha256", "source-not-text", "info-not-a-dict"])
def test_a_damaged_record_of_an_export_is_not_used(tmp_path, monkeypatch, tag_weights, golden_order, damage):
    """A weights record in the cache that is valid JSON but lacks what a run needs of it (the weights' source and
    hash, for the job file) is not trusted: the run reads the weights as if there were none, never a KeyError."""
    monkeypatch.setenv("I2V_HOME", str(tmp_path / "home"))
    base = ["tag", str(golden_order[0]), "-w", str(tag_weights), "-t", "0"]
    result = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "first.jsonl")])
    assert result.exit_code == 0, result.output
    (record,) = (tmp_path / "home" / "onnx-ort" / "weights").glob("*.json")
    content = json.loads(record.read_text())
    if damage == "no-sha256":
        del content["info"]["sha256"]
    elif damage == "source-not-text":
        content["info"]["source"] = None
    else:
        content["info"] = ["kind", "tag"]
    record.write_text(json.dumps(content))
    assert recall_export(tag_weights, 1) is None
    result = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "again.jsonl")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "first.jsonl").read_bytes()


@pytest.mark.parametrize("which", ["weights", "tag-list"])
def test_an_output_naming_the_weights_or_the_tag_list_is_refused(tmp_path, monkeypatch, tag_weights, which):
    """-o naming the weight file (or the --tags file) replaced it with the records: the run reads them, as it
    reads its images, so it refuses such an output before anything is written, as it does an input image."""
    from i2v_cli.tags import load_tag_list

    monkeypatch.setenv("I2V_HOME", str(tmp_path / "home"))
    weights = tmp_path / "tag.safetensors"
    weights.write_bytes(tag_weights.read_bytes())
    tags = tmp_path / "tags.json"
    tags.write_text(json.dumps(load_tag_list(None)))
    kept = {weights: weights.read_bytes(), tags: tags.read_bytes()}
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(image)
    target = weights if which == "weights" else tags
    fmt = "jsonl" if which == "weights" else "json"  # the format its extension allows
    args = ["tag", str(image), "-w", str(weights), "--tags", str(tags), "-f", fmt, "-o", str(target)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert f"-o {target} is one of the inputs ({target}): it would be destroyed" in result.stderr
    assert {path: path.read_bytes() for path in kept} == kept
