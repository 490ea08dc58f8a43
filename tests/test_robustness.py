"""Batch runs that never lose work: awkward and broken inputs, worker crashes, kills, Ctrl-C and --resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import crashing
from PIL import Image

from i2v_cli.cli import cli
from i2v_cli.resume import read_progress
from i2v_cli.runner import run_model
from i2v_cli.weights import load_model
from i2v_cli.writers import record_path


def _picture(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def awkward(tmp_path) -> tuple[Path, list[str], list[str]]:
    """A folder of awkward-but-valid images and of broken files: (folder, valid names, broken names)."""
    d = tmp_path / "mix"
    d.mkdir()
    base = _picture()
    base.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).save(d / "deep16.png")
    base.convert("LA").save(d / "la.png")
    base.convert("1").save(d / "onebit.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette_transparent.png", transparency=0)
    frames = [_picture(seed=i) for i in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    _picture((1, 1)).save(d / "one_pixel.png")
    base.save(d / "lossless.webp", lossless=True)
    base.save(d / "UPPER.JPG")
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(d / "rotated.jpg", exif=exif)
    base.save(d / "caf\xe9 latin1.png")
    base.save(d / "イラスト.png")
    valid = sorted(p.name for p in d.iterdir())

    (d / "empty.png").write_bytes(b"")
    good = io.BytesIO()
    base.save(good, "JPEG")
    (d / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (d / "noise.png").write_bytes(np.random.default_rng(1).bytes(500))
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "folder.png").mkdir()
    (d / "dangling.png").symlink_to(d / "does-not-exist.png")
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    raw = bytearray(bomb.getvalue())
    raw[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")  # IHDR claims 100000 x 100000
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")
    (d / "bomb.png").write_bytes(bytes(raw))
    broken = ["empty.png", "truncated.jpg", "noise.png", "text.jpg", "folder.png", "dangling.png", "bomb.png"]
    return d, valid, broken


def test_awkward_and_broken_folder(awkward, tag_weights):
    folder, valid, broken = awkward
    result = CliRunner().invoke(
        cli, ["tag", str(folder), "--weights", str(tag_weights), "--workers", "2", "-b", "4", "-t", "0.9"]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    records = {os.path.basename(r["path"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert set(records) == set(valid) | set(broken)
    for name in valid:
        assert "rating" in records[name], (name, records[name])
    for name in broken:
        assert set(records[name]) == {"path", "error"}
        assert name in result.stderr
    assert "empty" in records["empty.png"]["error"]
    assert "folder" in records["folder.png"]["error"]
    assert "truncated" in records["truncated.jpg"]["error"]
    assert "decompression bomb" in records["bomb.png"]["error"]
    assert "10000000000" in records["bomb.png"]["error"].replace(",", "")


def test_named_dangling_link_and_non_image_get_records(awkward, tag_weights):
    folder, _, _ = awkward
    result = CliRunner().invoke(
        cli,
        ["tag", str(folder / "dangling.png"), str(folder / "text.jpg"), str(folder / "la.png"), "--workers", "0",
         "--weights", str(tag_weights)],
    )  # fmt: skip
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [set(r) for r in records] == [{"path", "error"}, {"path", "error"}, set(records[2])]
    assert "dangling symbolic link" in records[0]["error"] and "text file" in records[1]["error"]
    assert "general" in records[2]


def test_named_missing_file_is_a_usage_error(awkward, tag_weights):
    folder, _, _ = awkward
    result = CliRunner().invoke(
        cli,
        [
            "tag",
            str(folder / "la.png"),
            str(folder / "absent-file.png"),
            "--workers",
            "0",
            "--weights",
            str(tag_weights),
        ],
    )
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"Error: no such file or folder: {str(folder / 'absent-file.png')!r}\n"


def test_non_utf8_name_is_reported_faithfully(tmp_path, tag_weights):
    name = os.fsdecode(b"bad\xff\xfename.png")
    _picture().save(tmp_path / name)
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(
        cli, ["tag", str(tmp_path), "-o", str(out), "--workers", "0", "--weights", str(tag_weights)]
    )
    assert result.exit_code == 0, result.output
    out.read_bytes().decode("utf-8")  # valid UTF-8 whatever the name
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record_path(record) == str(tmp_path / name)
    assert read_progress(str(out), "jsonl").done == {str(tmp_path / name)}


def _pictures(folder: Path, n: int, boom: int) -> list[str]:
    """``n`` small PNG files in ``folder``, in name order; the one at ``boom`` has BOOM in its name (see _crash_on)."""
    paths = []
    for i in range(n):
        name = f"{i:02d}-BOOM.png" if i == boom else f"{i:02d}.png"
        _picture(seed=i).save(folder / name)
        paths.append(str(folder / name))
    return paths


def _crash_on(pattern: str):
    """load_and_preprocess, killing its own process for paths containing ``pattern`` (see conftest.crashing)."""
    import i2v_cli.data

    return crashing(i2v_cli.data.load_and_preprocess, pattern)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork carrying the monkeypatch into workers")
def test_a_crashing_worker_becomes_that_images_error(tmp_path, tag_weights, monkeypatch):
    paths = []
    for i in range(7):
        name = f"{i}-BOOM.png" if i == 4 else f"{i}.png"
        _picture(seed=i).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    monkeypatch.setattr("i2v_cli.data.load_and_preprocess", _crash_on("BOOM"))
    model, _ = load_model(tag_weights)
    results = [r for batch in run_model(model, paths, batch_size=2, workers=2) for r in batch]
    assert [r.path for r in results] == paths
    assert [r.error is None for r in results] == [True] * 4 + [False] + [True] * 2
    assert "crashed" in results[4].error
    reference = [r for batch in run_model(model, [p for p in paths if "BOOM" not in p], batch_size=3) for r in batch]
    np.testing.assert_allclose(
        np.stack([r.output for r in results if r.output is not None]),
        np.stack([r.output for r in reference]),
        atol=1e-5,
    )


def _images(folder: Path, n: int, size=(640, 480)) -> None:
    folder.mkdir()
    for i in range(n):
        _picture(size, seed=i).save(folder / f"img{i:03d}.png")


def _i2v(*args: str) -> list[str]:
    return [sys.executable, "-m", "i2v_cli", *args]


def _kill_when(path: Path, proc: subprocess.Popen, lines: int, sig: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= lines:
            proc.send_signal(sig)
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail("the run did not produce output in time")


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_a_real_kill_equals_an_uninterrupted_run(tmp_path, tag_weights, fmt):
    folder = tmp_path / "imgs"
    _images(folder, 24, (320, 240))
    common = ["tag", str(folder), "--weights", str(tag_weights), "-b", "1", "--workers", "0", "-t", "0.2"]
    full, partial = tmp_path / f"full.{fmt}", tmp_path / f"partial.{fmt}"
    subprocess.run(_i2v(*common, "-o", str(full)), check=True, capture_output=True)

    proc = subprocess.Popen(_i2v(*common, "-o", str(partial)), stderr=subprocess.PIPE)
    _kill_when(partial, proc, full.read_text().count("\n") // 3, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < len(read_progress(str(partial), fmt).done) < 24

    done = subprocess.run(_i2v(*common, "-o", str(partial), "--resume"), capture_output=True)
    assert done.returncode == 0, done.stderr
    assert partial.read_text() == full.read_text()
    again = subprocess.run(_i2v(*common, "-o", str(partial), "--resume"), capture_output=True)
    assert again.returncode == 0 and partial.read_text() == full.read_text()


def test_resume_repairs_a_cut_off_tail(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"path": "a.png", "error": "x"}\n{"path": "b.p')
    progress = read_progress(str(jl), "jsonl")
    assert progress.done == {"a.png"}
    assert jl.read_bytes()[: progress.keep] == b'{"path": "a.png", "error": "x"}\n'
    c = tmp_path / "a.csv"
    c.write_text(
        "path,category,tag,score,error,path_b64\na.png,general,x,0.5,,\nb.png,general,x,0.5,,\nb.png,rating,sa"
    )
    progress = read_progress(str(c), "csv")
    assert progress.done == {"a.png"}
    assert list(csv.reader(c.read_bytes()[: progress.keep].decode().splitlines())) == [
        ["path", "category", "tag", "score", "error", "path_b64"],
        ["a.png", "general", "x", "0.5", "", ""],
    ]


def test_resume_needs_a_streamable_output(tmp_path, tag_weights, golden):
    runner = CliRunner()
    args = ["tag", str(golden / "images" / "sq"), "--weights", str(tag_weights), "--resume"]
    assert "needs -o FILE" in runner.invoke(cli, args).stderr
    result = runner.invoke(cli, [*args, "-o", str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "jsonl or csv" in result.stderr


def test_ctrl_c_stops_keeps_what_was_written_and_exits_130(tmp_path, tag_weights):
    folder = tmp_path / "imgs"
    _images(folder, 40)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        _i2v("tag", str(folder), "--weights", str(tag_weights), "-b", "1", "--workers", "2", "-o", str(out)),
        stderr=subprocess.PIPE,
    )
    _kill_when(out, proc, 3, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert b"Traceback" not in err
    lines = out.read_text().splitlines()
    assert 3 <= len(lines) < 40
    assert all("general" in json.loads(line) for line in lines)


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork carrying the monkeypatch into workers")
def test_decode_in_worker_survives_an_image_that_kills_its_decoder(tmp_path, monkeypatch):
    """What a Ray decoding task calls: one batch from one worker, or, when an image kills it, one process each."""
    from i2v_cli.data import decode_in_worker

    paths = _pictures(tmp_path, 4, boom=2)
    (tmp_path / "text.png").write_text("not an image")
    paths.append(str(tmp_path / "text.png"))
    clean = decode_in_worker([p for p in paths if "BOOM" not in p])
    assert clean.ok == [0, 1, 2] and list(clean.errors) == [3]
    monkeypatch.setattr("i2v_cli.data.load_and_preprocess", _crash_on("BOOM"))
    batch = decode_in_worker(paths)
    assert batch.ok == [0, 1, 3]
    assert batch.errors[2] == f"{paths[2]}: the image decoder crashed on this file (its worker process died)"
    assert batch.errors[4] == f"{paths[4]}: a text file, not an image"
    torch.testing.assert_close(batch.inputs, clean.inputs)
    assert decode_in_worker([]).ok == []


def test_decode_in_worker_leaves_sigchld_as_it_found_it(tmp_path, monkeypatch):
    # torch installs a SIGCHLD handler for good when a loader starts in the main thread, as decode_in_worker's does;
    # a later run's dying worker (in its reader thread) then raised in the main thread instead of costing only its
    # image: test_outputs' slow-consumer test failed after this file's tests had run in the same process.
    from i2v_cli.data import decode_in_worker, iter_batches

    paths = _pictures(tmp_path, 3, boom=1)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        monkeypatch.setattr("i2v_cli.data.load_and_preprocess", _crash_on("BOOM"))
        for _ in range(2):
            assert decode_in_worker(paths).ok == [0, 2]
            assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
        batches = list(iter_batches(paths, batch_size=1, workers=1))
        assert [b.ok for b in batches] == [[0], [], [2]] and list(batches[1].errors) == [1]
    finally:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if previous is None else previous)


def test_a_crash_in_a_shared_batch_costs_only_its_image(tmp_path, monkeypatch):
    """Workers sharing each network batch (jobs of part of a batch): a decoder that kills its worker in the middle
    of one costs that image only; the batch's other parts, decoded by other workers, are decoded again, in order."""
    from i2v_cli.data import iter_batches

    paths = _pictures(tmp_path, 14, boom=6)
    (clean,) = iter_batches(paths[:6] + paths[7:], batch_size=13, workers=0)
    monkeypatch.setattr("i2v_cli.data.load_and_preprocess", _crash_on("BOOM"))
    batches = list(iter_batches(paths, batch_size=8, workers=2))
    assert [b.ok for b in batches] == [[0, 1, 2, 3, 4, 5, 7], [8, 9, 10, 11, 12, 13]]
    assert list(batches[0].errors) == [6] and "decoder crashed" in batches[0].errors[6]
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), clean.inputs)
