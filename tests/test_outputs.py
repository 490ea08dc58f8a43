"""Outputs you can trust (issue "One pipeline, outputs you can trust"): each test here failed on the code before it.

Valid UTF-8 whatever the names, -o where the user pointed, no input or foreign file destroyed, resume of the same
job only, signals, one writer per output, write errors as messages, formats that do what they say, an index pair
that cannot lie.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import GOLDEN, crashing
from PIL import Image

from i2v_cli.cli import cli
from i2v_cli.errors import OutputError
from i2v_cli.features import FeatureFileError, read_features
from i2v_cli.resume import JobLock, make_job, read_progress
from i2v_cli.writers import CSV_COLUMNS, record_path

BAD = os.fsdecode(b"na\xefve.png")  # not valid UTF-8


def _picture(size=(64, 48), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        _picture(seed=i).save(d / f"img{i}.png")
    _picture(seed=9).save(d / BAD)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return d


def tag(*args, weights, input=None):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--weights", str(weights), *map(str, args)], input=input)


def _i2v(*args: str) -> list[str]:
    return [sys.executable, "-m", "i2v_cli", *args]


# 1. Valid UTF-8, always -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv"])
def test_output_is_valid_utf8_and_keeps_the_exact_name(tmp_path, folder, tag_weights, fmt):
    out = tmp_path / f"out.{fmt}"
    result = tag(folder, "-o", out, weights=tag_weights)
    assert result.exit_code == 1  # broken.png
    text = out.read_bytes().decode("utf-8")  # strict: raises on the old output
    if fmt == "json":
        records = json.loads(text)
    elif fmt == "jsonl":
        records = [json.loads(line) for line in text.splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
        assert list(rows[0]) == list(CSV_COLUMNS)
        records = [{"path": r["path"], "path_b64": r["path_b64"]} for r in rows]
    names = {record_path(r) for r in records}
    assert str(folder / BAD) in names
    shown = [r["path"] for r in records if r.get("path_b64")]
    assert shown and all(p.endswith("na\\xefve.png") for p in shown)


def test_resume_matches_the_exact_non_utf8_name(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    tag(folder, "-o", out, weights=tag_weights)
    first = out.read_bytes()
    again = tag(folder, "-o", out, "--resume", weights=tag_weights)
    assert "already in" in again.stderr
    # Only the broken image is tried again (it has a record: it is done), nothing is duplicated.
    assert out.read_bytes() == first


def test_messages_stay_one_line(tmp_path, tag_weights):
    name = tmp_path / "new\nline.png"
    name.write_bytes(b"not an image")
    result = tag(name, weights=tag_weights)
    failure = [line for line in result.stderr.splitlines() if "line.png" in line]
    assert len(failure) == 1 and "new\\nline.png" in failure[0]


# 2. -o writes where the user pointed ---------------------------------------------------------------------------


def test_output_through_a_symlink_keeps_the_link(tmp_path, folder, tag_weights):
    target = tmp_path / "target.json"
    target.write_text("[]")
    link = tmp_path / "link.json"
    link.symlink_to("target.json")
    tag(folder, "-o", link, weights=tag_weights)
    assert link.is_symlink()
    assert len(json.loads(target.read_text())) == 5


def test_a_fifo_output_is_written_not_replaced(tmp_path, folder, tag_weights):
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        _i2v("tag", str(folder), "--weights", str(tag_weights), "-f", "json", "-o", str(fifo)),
        stderr=subprocess.PIPE,
    )
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, even if nothing ever writes to it
    chunks = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            chunk = None
        if chunk:
            chunks.append(chunk)
        elif proc.poll() is not None:
            break
        else:
            time.sleep(0.01)
    os.close(fd)
    proc.wait(timeout=60)
    data = b"".join(chunks)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert len(json.loads(data)) == 5


def test_dev_stdout_and_dash_mean_stdout(folder, tag_weights):
    before = stat.S_IFMT(os.lstat("/dev/stdout").st_mode)  # a symlink (or a device): never a regular file after
    for out in ("/dev/stdout", "-"):
        proc = subprocess.run(
            _i2v("tag", str(folder), "--weights", str(tag_weights), "-f", "json", "-o", out), capture_output=True
        )
        assert proc.returncode == 1, proc.stderr
        assert len(json.loads(proc.stdout)) == 5
    assert stat.S_IFMT(os.lstat("/dev/stdout").st_mode) == before


@pytest.mark.parametrize("out", ["/dev/stderr", "/dev/fd/2", "same file"])
@pytest.mark.parametrize("command", ["tag", "convert"])
def test_standard_error_as_output_is_refused(tmp_path, folder, tag_weights, out, command):
    """-o /dev/stderr (or the file that 2> names) took the output, then i2v's own messages after it: exit 0 and a
    safetensors file no reader could open, or JSON followed by a summary line."""
    err = tmp_path / "err.out"
    target = str(err) if out == "same file" else out
    args = ["tag", str(folder), "--weights", str(tag_weights), "-f", "json"] if command == "tag" else [
        "weights", "convert", str(GOLDEN / "models" / "tag_v2.caffemodel")]  # fmt: skip
    with open(err, "ab") as stderr:
        proc = subprocess.run(_i2v(*args, "-o", target), stdout=subprocess.PIPE, stderr=stderr)
    assert proc.returncode == 2 and proc.stdout == b""
    assert err.read_bytes().decode() == (
        f"Error: -o {target} is where i2v writes its messages (standard error): they would mix with the output and "
        "spoil it; name a file, or write to standard output (-o -)\n"
    )
    # /dev/null for both (cron, subprocess.DEVNULL) keeps nothing to spoil: written (it was refused, exit 2)
    with open(os.devnull, "wb") as null:
        proc = subprocess.run(_i2v(*args, "-o", "/dev/null"), stdout=subprocess.PIPE, stderr=null)
    assert proc.returncode in (0, 1)
    # standard error that is standard output too (2>&1) is -o -: written, messages after the records
    proc = subprocess.run(_i2v(*args, "-o", "/dev/stderr"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode in (0, 1) and len(proc.stdout) > 1000


# 3. Never destroy an input or a foreign file -------------------------------------------------------------------


def test_output_naming_an_input_is_refused(tmp_path, folder, tag_weights):
    victim = folder / "img1.png"
    before = victim.read_bytes()
    link = tmp_path / "alias.jsonl"
    link.symlink_to(victim)
    for out in (victim, link):
        result = tag(folder, "-f", "jsonl", "-o", out, weights=tag_weights)
        assert result.exit_code == 2 and "is one of the inputs" in result.stderr
    assert victim.read_bytes() == before


def _foreign_files(where: Path) -> dict[Path, bytes]:
    """Files that are not i2v's outputs, each named with an extension i2v writes: a slip of ``-o`` to them must
    leave them alone."""
    import sqlite3

    where.mkdir()
    _picture().save(where / "photo.json", format="PNG")
    _picture().save(where / "photo.jsonl", format="JPEG")
    with sqlite3.connect(where / "library.csv") as db:
        db.execute("CREATE TABLE t (x)")
    db.close()
    (where / "weights.json").write_bytes((12).to_bytes(8, "little") + b'{"__m": {}}')
    _picture().save(where / "icon.json", format="ICO")  # kinds the sniffer has no name for are refused too
    (where / "archive.csv").write_bytes(b"\xfd7zXZ\x00\x00" + bytes(range(256)))  # xz
    return {path: path.read_bytes() for path in sorted(where.iterdir())}


def test_an_existing_foreign_file_is_never_replaced(tmp_path, folder, tag_weights, feature_weights):
    foreign = _foreign_files(tmp_path / "foreign")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "foreign" / "photo.json")
    for out in [*foreign, link]:
        result = tag(folder, "-o", out, weights=tag_weights)
        assert result.exit_code == 2, result.output
        assert "not an output of this command" in result.stderr and "\n" not in result.stderr.strip()
    npy = tmp_path / "vectors.npy"
    npy.write_bytes(foreign[tmp_path / "foreign" / "library.csv"])
    result = CliRunner().invoke(cli, ["features", str(folder), "--weights", str(feature_weights), "-o", str(npy)])
    assert result.exit_code == 2 and "SQLite database" in result.stderr
    assert {path: path.read_bytes() for path in foreign} == foreign
    assert not list(tmp_path.glob("foreign/.*")), "no job file beside a foreign file either"


def test_an_earlier_output_is_still_replaced(tmp_path, folder, tag_weights, feature_weights, monkeypatch):
    """Also one whose text starts like an image (the first record's path is GIF89a.png: a blocklist of magic numbers
    refused the second run), and one that is not text (a name with a control character, written raw in CSV)."""
    for name in ("GIF89a.png", "bell\a.png"):
        _picture(seed=5).save(folder / name)
    for fmt in ("json", "jsonl", "csv"):
        out = tmp_path / f"out.{fmt}"
        for _ in range(2):
            assert tag(folder, "-o", out, weights=tag_weights).exit_code == 1  # img4.txt is not an image
    npy = tmp_path / "vectors.npy"
    for _ in range(2):
        result = CliRunner().invoke(cli, ["features", str(folder), "--weights", str(feature_weights), "-o", str(npy)])
        assert result.exit_code == 1, result.output
    assert read_features(npy).vectors.shape[0] == 6  # 5 pictures and the one with a non-UTF-8 name
    text = tmp_path / "sim.txt"
    monkeypatch.chdir(folder)
    for _ in range(2):
        result = CliRunner().invoke(cli, ["similar", "GIF89a.png", "-i", str(npy), "-o", str(text)])
        assert result.exit_code == 0, result.output
    assert text.read_bytes().startswith(b"GIF89a")


def test_weights_commands_never_replace_a_foreign_file(tmp_path, golden, folder, full_folder):
    """`weights convert -o` and `weights calibrate -o` replaced an image or an index named by mistake; calibrate on
    a full disk was an OSError traceback."""
    run = CliRunner()
    model = str(golden / "models" / "tag_v1.caffemodel")
    foreign = _foreign_files(tmp_path / "foreign")
    for out in foreign:
        if out.name != "weights.json":  # a safetensors file: what convert writes, replaced as a re-run's would be
            result = run.invoke(cli, ["weights", "convert", model, "-o", str(out)])
            assert result.exit_code == 2 and "not an output of this command" in result.stderr, result.output
        result = run.invoke(cli, ["weights", "calibrate", str(folder), "-o", str(out)])
        assert result.exit_code == 2 and "not an output of this command" in result.stderr, result.output
    assert {path: path.read_bytes() for path in foreign} == foreign
    for _ in range(2):  # its own kind of file is replaced: a second conversion, a second calibration
        assert run.invoke(cli, ["weights", "convert", model, "-o", str(tmp_path / "t.safetensors")]).exit_code == 0
        assert run.invoke(cli, ["weights", "calibrate", str(folder), "-o", str(tmp_path / "c.npz")]).exit_code == 1
    result = run.invoke(cli, ["weights", "calibrate", str(folder), "-o", str(full_folder / "c.npz")])
    assert result.exit_code == 3 and "No space left on device" in result.stderr, result.output
    assert "Traceback" not in result.output and sorted(p.name for p in full_folder.iterdir()) == ["fill"]


def test_resume_never_changes_a_foreign_file(tmp_path, folder, tag_weights):
    notes = tmp_path / "notes.jsonl"
    notes.write_bytes(b'{"a": 1}\n{"b": 2')
    result = tag(folder, "-o", notes, "--resume", weights=tag_weights)
    assert result.exit_code == 2 and "no record of an i2v run" in result.stderr
    assert notes.read_bytes() == b'{"a": 1}\n{"b": 2'
    png = tmp_path / "pic.png"
    _picture().save(png)
    before = png.read_bytes()
    result = tag(folder, "-f", "jsonl", "-o", png, "--resume", weights=tag_weights)
    assert result.exit_code == 2 and png.read_bytes() == before


# 4. Resume is exact and refuses a different job ----------------------------------------------------------------


def test_resume_refuses_other_options_naming_the_difference(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    tag(folder / "img0.png", "-o", out, "-t", "0.5", weights=tag_weights)
    before = out.read_bytes()
    result = tag(folder, "-o", out, "--resume", "-t", "0.3", weights=tag_weights)
    assert result.exit_code == 2
    assert "thresholds" in result.stderr and "0.5" in result.stderr and "0.3" in result.stderr
    assert out.read_bytes() == before
    result = tag(folder, "-o", out, "--resume", "-t", "0.5", weights=tag_weights)
    assert result.exit_code == 1 and len(out.read_text().splitlines()) == 5


def test_resume_reads_in_bounded_memory(tmp_path):
    out = tmp_path / "big.csv"
    row = "img{:07d}.png,general,long hair,0.5,,\n"
    with open(out, "w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for i in range(200_000):
            f.write(row.format(i))
    size = out.stat().st_size
    tracemalloc.start()
    progress = read_progress(str(out), "csv")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(progress.done) == 199_999  # the last image's rows are written again
    assert peak < size * 4  # the set of paths, not copies of the whole file (2.4 GB for 185 MB before)


def test_features_resume(tmp_path, folder, feature_weights):
    run = CliRunner()
    full, part = tmp_path / "full.npy", tmp_path / "part.npy"
    common = ["features", "--workers", "0", "--weights", str(feature_weights)]
    run.invoke(cli, [*common, str(folder), "-o", str(full)])
    run.invoke(cli, [*common, str(folder / "img0.png"), str(folder / "img1.png"), "-o", str(part)])
    result = run.invoke(cli, [*common, str(folder), "-o", str(part), "--resume"])
    assert result.exit_code == 1, result.stderr  # broken.png
    a, b = read_features(full), read_features(part)
    assert a.paths == b.paths
    np.testing.assert_allclose(np.asarray(a.vectors), np.asarray(b.vectors), atol=1e-4, rtol=1e-5)


# 5. Signals ----------------------------------------------------------------------------------------------------


def _slow_run(tmp_path, weights, out, n, *extra) -> subprocess.Popen:
    imgs = tmp_path / "many"
    imgs.mkdir()
    for i in range(n):
        _picture((320, 240), seed=i).save(imgs / f"i{i:03d}.png")
    return subprocess.Popen(
        _i2v("tag", str(imgs), "--weights", str(weights), "-b", "1", "-j", "1", "-o", str(out), *extra),
        stderr=subprocess.PIPE,
        preexec_fn=_default_sighup,
    )


def _default_sighup() -> None:
    # Under `nohup` (a CI job started with it) SIGHUP is inherited as ignored, and i2v rightly keeps it ignored:
    # the child starts with the default disposition, as from a terminal.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_keep_the_work_like_ctrl_c(tmp_path, tag_weights, sig):
    out, n = tmp_path / "out.json", 300
    proc = _slow_run(tmp_path, tag_weights, out, n)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # signal once the JSON being written has records
        tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".i2v-out.json")]
        if tmp and tmp[0].stat().st_size > 0 and b'"path"' in tmp[0].read_bytes():
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert b"Traceback" not in err
    records = json.loads(out.read_text())  # a whole JSON list of the records done
    assert 0 < len(records) < n
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".i2v-")] == []


@pytest.mark.timeout(180)
def test_ctrl_c_at_a_terminal_stops_a_run_with_workers(tmp_path, tag_weights):
    """Ctrl-C sends SIGINT to the whole process group: the workers got the run's own handler, left their loops and
    waited at exit, ignoring the SIGTERM meant to end them, so the run never ended (it hung with -j 2)."""
    imgs = tmp_path / "many"
    imgs.mkdir()
    for i in range(300):
        _picture((320, 240), seed=i).save(imgs / f"i{i:03d}.png")
    out = tmp_path / "out.jsonl"
    cmd = _i2v("tag", str(imgs), "--weights", str(tag_weights), "-b", "1", "-j", "2", "-o", str(out))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, start_new_session=True)  # its own group, as at a terminal
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size):
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and 0 < len(out.read_text().splitlines()) < 300


def test_a_signal_that_a_library_turned_into_its_own_error_is_still_an_interruption(
    tmp_path, folder, tag_weights, monkeypatch
):
    """Ctrl-C while the weights loaded came out of the safetensors reader as "not a valid safetensors file" (exit 2):
    the signal came first, so it is exit 130. (Here the handler runs inside the output check, whose error stands
    for the library's.)"""
    from i2v_cli import writers
    from i2v_cli.cli import common

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def interrupted_inside(*args, **kwargs):
        try:
            common._raise_interrupted(signal.SIGINT, None)  # the handler, run inside native code...
        except KeyboardInterrupt:
            raise OutputError("x.safetensors is not a valid safetensors file (truncated or corrupt)") from None

    monkeypatch.setattr(writers, "check_output", interrupted_inside)
    monkeypatch.setattr(common, "_stopped_by", None)  # and as it was after the test
    try:
        result = tag(folder, "-o", tmp_path / "out.jsonl", weights=tag_weights)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert result.exit_code == 130, result.output
    assert "not a valid safetensors" not in result.stderr and "interrupted" in result.stderr


def test_sigpipe_ends_quietly(tmp_path, folder, tag_weights):
    cmd = " ".join(_i2v("tag", str(folder), "--weights", str(tag_weights), "-b", "1", "-j", "0"))
    proc = subprocess.run(
        ["bash", "-c", f"{cmd} 2>{tmp_path / 'err'} | head -n 1 >/dev/null; echo ${{PIPESTATUS[0]}}"],
        capture_output=True,
        text=True,
    )
    assert proc.stdout.strip() in ("0", "141")
    assert "Traceback" not in (tmp_path / "err").read_text()


# 6. One writer per output --------------------------------------------------------------------------------------


def test_a_second_writer_is_refused(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    out.write_text("")
    lock = JobLock(str(out), make_job("tag", "jsonl", {}, {}))
    try:
        result = tag(folder, "-o", out, weights=tag_weights)
        assert result.exit_code == 2 and "another i2v run is writing" in result.stderr
        assert out.read_text() == ""
    finally:
        lock.release()
    assert tag(folder, "-o", out, weights=tag_weights).exit_code == 1


def test_a_job_file_whose_update_fails_keeps_the_last_status(tmp_path, monkeypatch):
    """A full disk (or a kill) while the status is updated leaves the previous record whole, not an empty file that
    --resume would refuse as not i2v's."""
    import errno

    out = tmp_path / "out.jsonl"
    job = make_job("tag", "jsonl", {"threshold": 0.5}, {})
    lock = JobLock(str(out), job)
    try:
        lock.record("interrupted")
        lock.record("running")  # shorter than the last: padded, still one JSON document

        def full(fd, data, offset):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OutputError, match="No space left"):
            lock.record("complete")
    finally:
        lock.release()
    monkeypatch.undo()
    kept = json.loads((tmp_path / ".out.jsonl.i2v.json").read_text())
    assert kept == {**job, "status": "running"}
    again = JobLock(str(out), job)
    try:
        assert again.previous == kept
    finally:
        again.release()


def test_a_run_that_locks_a_job_file_removed_meanwhile_locks_the_new_one(tmp_path, monkeypatch):
    """A refused run removes its empty job file on release; a run that opened it just before must not keep a lock on
    the removed file (a third run would then lock a new one and write the same output at once)."""
    import fcntl

    import i2v_cli.resume as resume

    out = str(tmp_path / "out.jsonl")
    first = JobLock(out, make_job("tag", "jsonl", {}, {}))
    real, calls = fcntl.flock, [0]

    def released_just_before(fd, op):
        calls[0] += 1
        if calls[0] == 1:
            first.release()  # between the second run's open and its lock
        return real(fd, op)

    monkeypatch.setattr(resume.fcntl, "flock", released_just_before)
    second = JobLock(out, make_job("tag", "jsonl", {}, {}))
    try:
        assert calls[0] == 2 and os.path.samestat(os.fstat(second._fd), os.stat(second.path))
    finally:
        second.release()


# 7. Write errors are messages ----------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_is_one_line_and_exit_3(folder, tag_weights):
    proc = subprocess.run(
        _i2v("tag", str(folder), "--weights", str(tag_weights), "-o", "/dev/full"), capture_output=True
    )
    assert proc.returncode == 3, proc.stderr
    assert b"Traceback" not in proc.stderr and b"No space left on device" in proc.stderr
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_resume_into_a_folder_is_a_usage_error(tmp_path, folder, tag_weights):
    result = tag(folder, "-o", tmp_path, "--resume", weights=tag_weights)
    assert result.exit_code == 2 and "is a folder" in result.stderr and "Traceback" not in result.output


@pytest.mark.parametrize("name", ["a.json", "a.jsonl", "a.csv", "v.npy"])
def test_an_output_on_a_full_disk_is_exit_3_from_its_start(folder, tag_weights, feature_weights, full_folder, name):
    """The job file's first write hit the full disk and was a usage error (exit 2); the README's table says 3."""
    command, weights = ("features", feature_weights) if name.endswith(".npy") else ("tag", tag_weights)
    result = CliRunner().invoke(
        cli, [command, str(folder), "-w", str(weights), "-j", "0", "-o", str(full_folder / name)]
    )
    assert result.exit_code == 3, result.output
    assert "No space left on device" in result.stderr and "Traceback" not in result.output


# 8. Formats do what they say -----------------------------------------------------------------------------------


def test_format_contradicting_the_extension_is_refused(tmp_path, folder, tag_weights, feature_weights):
    result = tag(folder, "-f", "csv", "-o", tmp_path / "x.json", weights=tag_weights)
    assert result.exit_code == 2 and "extension of json" in result.stderr
    assert not (tmp_path / "x.json").exists()
    result = tag(folder, "-f", "jsonl", "-o", tmp_path / "f.npy", weights=tag_weights)
    assert result.exit_code == 2
    result = CliRunner().invoke(cli, ["features", str(folder), "--weights", str(feature_weights), "-o", "x.json"])
    assert result.exit_code == 2 and not Path("x.json").exists()


def test_no_nan_in_json(tmp_path, folder, tag_weights, monkeypatch):
    import torch

    from i2v_cli import runner

    def nan_predict(net, inputs, device, batch_size=None):
        return np.full((len(inputs), 1539), np.nan, np.float32)

    monkeypatch.setattr(runner, "predict", nan_predict)
    out = tmp_path / "out.json"
    result = tag(folder, "-o", out, weights=tag_weights)
    assert result.exit_code == 1
    records = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert all("error" in r for r in records)
    assert sum("the network's output is not finite" in r["error"] for r in records) == 4  # all but broken.png
    del torch


# 9. The index pair cannot lie ----------------------------------------------------------------------------------


def test_reordered_paths_are_refused(tmp_path, folder, feature_weights):
    out = tmp_path / "vecs.npy"
    CliRunner().invoke(
        cli, ["features", str(folder), "--workers", "0", "--weights", str(feature_weights), "-o", str(out)]
    )
    paths = tmp_path / "vecs.paths.jsonl"
    lines = paths.read_bytes().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]
    paths.write_bytes(b"\n".join(lines))
    with pytest.raises(FeatureFileError, match="changed after it was written"):
        read_features(out)


# 10. Summary line, --version -----------------------------------------------------------------------------------


def test_summary_line_and_version(folder, tag_weights):
    result = tag(folder / "img0.png", weights=tag_weights)
    assert result.stderr.startswith("i2v: tagged 1 of 1 images in ")
    version = CliRunner().invoke(cli, ["--version"])
    assert "torch" in version.output and "devices: cpu" in version.output
    import i2v_cli

    assert i2v_cli.__version__ in version.output


# Start-up: help and usage errors without loading torch ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [[], ["tag"], ["features"], ["similar"], ["weights"], ["weights", "convert"],
     ["tag", "/no/such/folder", "--"], ["features", "/no/such.png", "--"],
     ["tag", "x.png", "-f", "csv", "-o", "x.json", "--"]],
)  # fmt: skip
def test_help_and_usage_errors_do_not_load_torch(args):
    argv = args[:-1] if args[-1:] == ["--"] else [*args, "-h"]  # "--" marks a usage error, not a help request
    code = (
        "import sys\nfrom i2v_cli.cli import cli\n"
        f"try:\n    cli({argv!r}, prog_name='i2v')\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'onnxruntime' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stderr


# The other entry points (issue "Every entry point as safe as i2v tag") --------------------------------------------


def test_a_usage_error_found_late_leaves_the_output_alone(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    result = tag(folder, "-o", out, "--precision", "fp16", weights=tag_weights)
    assert result.exit_code == 2 and "fp16" in result.stderr
    result = tag(folder, "-o", out, "--backend", "onnxruntime", "--precision", "bf16", weights=tag_weights)
    assert result.exit_code == 2
    assert out.read_text() == "earlier\n"


def test_similar_output_naming_the_index_is_refused(tmp_path, folder, feature_weights):
    run = CliRunner()
    vecs = tmp_path / "vecs.npy"
    run.invoke(cli, ["features", str(folder), "--workers", "0", "--weights", str(feature_weights), "-o", str(vecs)])
    before = (vecs.read_bytes(), (tmp_path / "vecs.paths.jsonl").read_bytes())
    query = ["similar", str(folder / "img0.png"), "-i", str(vecs)]
    result = run.invoke(cli, [*query, "-o", str(tmp_path / "vecs.paths.jsonl")])
    assert result.exit_code == 2 and "is one of the inputs" in result.stderr
    result = run.invoke(cli, [*query, "-o", str(vecs)])
    assert result.exit_code == 2 and "this command writes text, json, jsonl, not npy" in result.stderr
    (tmp_path / "alias.json").symlink_to(vecs)
    result = run.invoke(cli, [*query, "-o", str(tmp_path / "alias.json")])
    assert result.exit_code == 2 and "is one of the inputs" in result.stderr
    assert (vecs.read_bytes(), (tmp_path / "vecs.paths.jsonl").read_bytes()) == before


def test_similar_knows_an_indexed_file_by_any_name(tmp_path, folder, feature_weights, monkeypatch):
    run = CliRunner()
    vecs = tmp_path / "vecs.npy"
    run.invoke(cli, ["features", str(folder), "--workers", "0", "--weights", str(feature_weights), "-o", str(vecs)])
    (tmp_path / "link.png").symlink_to(folder / "img1.png")
    os.link(folder / "img2.png", tmp_path / "hard.png")
    (tmp_path / "linked").symlink_to(folder)
    ff = read_features(vecs)
    row = {p: i for i, p in enumerate(ff.paths)}
    assert ff.row(str(tmp_path / "link.png")) == row[str(folder / "img1.png")]
    assert ff.row(str(tmp_path / "hard.png")) == row[str(folder / "img2.png")]
    assert ff.row(str(tmp_path / "linked" / "img0.png")) == row[str(folder / "img0.png")]
    # A stored relative path is the file it named where the features were written, not one of the same name here.
    monkeypatch.chdir(folder)
    CliRunner().invoke(
        cli, ["features", "img0.png", "img1.png", "--workers", "0", "--weights", str(feature_weights), "-o", "rel.npy"]
    )
    rel = read_features(folder / "rel.npy")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _picture(seed=42).save(elsewhere / "img0.png")
    monkeypatch.chdir(elsewhere)
    assert rel.row("img0.png") is None  # another file that happens to have the name
    assert rel.row(str(folder / "img0.png")) == 0


def test_resume_reads_records_split_on_newlines_only(tmp_path, tag_weights):
    d = tmp_path / "odd"
    d.mkdir()
    for i, name in enumerate(["a\u2028b.png", "c\u0085d.png", "e.png"]):
        _picture(seed=i).save(d / name)
    out = tmp_path / "out.jsonl"
    assert tag(d, "-o", out, weights=tag_weights).exit_code == 0
    before = out.read_bytes()
    again = tag(d, "-o", out, "--resume", weights=tag_weights)
    assert again.exit_code == 0, again.stderr
    assert out.read_bytes() == before


# A decoding worker that dies costs only its image, even with a slow consumer ----------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork carrying the monkeypatch into workers")
def test_a_dying_worker_with_a_slow_consumer_costs_one_image(tmp_path, tag_weights, monkeypatch):
    from i2v_cli import data
    from i2v_cli.runner import run_model
    from i2v_cli.weights import load_model

    paths = []
    for i in range(8):
        name = f"{i}-BOOM.png" if i == 3 else f"{i}.png"
        _picture(seed=i).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    monkeypatch.setattr(data, "load_and_preprocess", crashing(data.load_and_preprocess))
    model, _ = load_model(tag_weights)
    results = []
    for batch in run_model(model, paths, batch_size=1, workers=2):
        time.sleep(0.3)  # a slow consumer: the worker dies while the main thread is busy elsewhere
        results.extend(batch)
    assert [r.path for r in results] == paths
    assert [r.error is None for r in results] == [True] * 3 + [False] + [True] * 4
    assert "crashed" in results[3].error


def test_tag_help_groups_its_options():
    text = CliRunner().invoke(cli, ["tag", "-h"]).output
    sections = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections == ["Options:", "Caption files:", "The network:", "Ray cluster (--engine ray):"]
    assert text.index("Caption files:") < text.index("--caption-sep") < text.index("The network:")
    assert text.index("Ray cluster") < text.index("--shard-size")
