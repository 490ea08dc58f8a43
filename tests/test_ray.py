"""`--engine ray` on a real two-node Ray cluster on this machine: the same records as the local engine, exactly
one record per input when the network actor is killed midway, and --resume finishing an interrupted run.

The cluster (a head and a worker node, started with `ray start`, each in a process group of its own) lives for
this module's tests and is stopped after them, whatever happened: its dozen processes do not load the machine
through the rest of the suite. The tests skip when the `ray` extra is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.features import read_features
from i2v_cli.writers import record_path

ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
RAY = Path(sys.executable).with_name("ray")
TIMEOUT = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End a `ray start --block` and every process it started (its process group): gently, then for sure."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever is left (an exited process group member is a no-op)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


@pytest.fixture(scope="module")
def cluster():
    """A head and a worker node on this machine; yields (address, hold folder shared with the actors)."""
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
    root = Path(tempfile.mkdtemp(prefix="i2vray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    hold = root / "hold"
    hold.mkdir()
    env = {**os.environ, **ENV, "I2V_RAY_HOLD_DIR": str(hold)}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=2", "--object-store-memory=100000000", "--disable-usage-stats"]
    nodes = []
    try:
        head = [str(RAY), "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root}/h"]
        nodes.append(_popen([*head, *common], env, root / "head.log"))
        _wait_for_nodes(address, 1, env, nodes)
        worker = [str(RAY), "start", f"--address={address}", f"--temp-dir={root}/w"]
        nodes.append(_popen([*worker, *common], env, root / "worker.log"))
        _wait_for_nodes(address, 2, env, nodes)
        yield address, hold
    finally:
        for proc in reversed(nodes):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _popen(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(args, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_nodes(address: str, n: int, env: dict[str, str], nodes: list[subprocess.Popen]) -> None:
    probe = (
        f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in nodes):
            pytest.fail("`ray start` exited; see its log in the session's temporary folder")
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
            return
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not reach {n} nodes in 90 s")


@pytest.fixture(scope="module")
def images(tmp_path_factory, golden):
    """Twelve golden images, one file that is not an image, and one missing name, in a folder."""
    folder = tmp_path_factory.mktemp("rayimgs")
    sources = sorted((golden / "images" / "sq").iterdir()) + sorted((golden / "images" / "mixed").iterdir())
    for i, src in enumerate(sources):
        shutil.copy(src, folder / f"im{i:02d}{src.suffix}")
    (folder / os.fsdecode(b"im05b-\xff.png")).write_text("not an image")  # a name that is not UTF-8, too
    return folder


BROKEN = os.fsdecode(b"im05b-\xff.png")
SHOWN = "im05b-\\xff.png"  # as records and messages show it


def _ray(args, address, cwd, **kwargs) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "i2v_cli", *map(str, args), "--engine", "ray", "--ray-address", address]
    env = {**os.environ, **ENV}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the ray run did not finish in {TIMEOUT} s:\n{err}")
    return proc.returncode, err


def _local_jsonl(images, weights, tmp_path) -> str:
    out = tmp_path / "local.jsonl"
    result = CliRunner().invoke(cli, ["tag", str(images), "-t", "0", "-j", "0", "-w", str(weights), "-o", str(out)])
    assert result.exit_code == 1, result.output  # the file that is not an image
    return out.read_text()


def assert_same_records(got: list[dict], want: list[dict]) -> None:
    """The same records in the same order: paths, fields, errors and tags equal, scores within 1e-5."""
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert list(g) == list(w)
        if "error" in w:
            assert g == w
            continue
        for category in ("general", "character", "copyright", "rating"):
            assert set(g[category]) == set(w[category])
            np.testing.assert_allclose([g[category][t] for t in w[category]], list(w[category].values()), atol=1e-5)


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _shards(out: Path) -> list[dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    return manifest["shards"]


def _joined(out: Path) -> str:
    # Strict UTF-8: whatever the file names, every shard and the manifest are valid UTF-8.
    (out / "manifest.json").read_bytes().decode("utf-8")
    return "".join((out / s["file"]).read_bytes().decode("utf-8") for s in _shards(out))


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {pattern} appeared: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.1)
    pytest.fail(f"no {pattern} in {folder} after {TIMEOUT} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tag_records_equal_the_local_engine(cluster, images, tag_weights, tmp_path):
    address, _ = cluster
    local = _local_jsonl(images, tag_weights, tmp_path)
    proc = _ray(["tag", images, "-t", "0", "-w", tag_weights, "--shard-size", "4", "-o", "out"], address, tmp_path)
    code, err = _finish(proc)
    assert code == 1, err
    assert f"i2v: {images}/{SHOWN}: a text file, not an image" in err
    assert "i2v: ray: 13 images, 1 failed" in err
    assert_same_records(_records(_joined(tmp_path / "out")), _records(local))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["records"], manifest["errors"], len(manifest["shards"])) == (13, 1, 4)
    assert manifest["options"]["transfer"] == "float32"  # the default: exact, the records of a local run


def test_uint8_transfer_rounds_the_network_input(cluster, images, tag_weights, tmp_path):
    """--ray-transfer uint8: the records of the local pipeline on each image's resized pixels rounded to uint8,
    within UINT8_BOUND of the exact records; the manifest records the mode and a resume with another is refused."""
    from PIL import Image

    from i2v_cli.ray_engine import UINT8_BOUND, round_inputs
    from i2v_cli.transform import load_and_preprocess

    address, _ = cluster
    exact = _records(_local_jsonl(images, tag_weights, tmp_path))
    # The expectation, through the library: the exact transform, rounded to uint8 and saved as a 224 x 224 PNG,
    # which the local pipeline takes as it is (no resize), then normalises and runs as the actor does.
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    for src in sorted(images.iterdir()):
        if src.name != BROKEN:
            Image.fromarray(round_inputs(load_and_preprocess(src)[None])[0]).save(rounded / f"{src.stem}.png")
    out = tmp_path / "want.jsonl"
    result = CliRunner().invoke(
        cli, ["tag", str(rounded), "-t", "0", "-j", "0", "-w", str(tag_weights), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    want = _records(out.read_text())

    args = ["tag", images, "-t", "0", "-w", tag_weights, "--shard-size", "4", "-o", "out"]
    code, err = _finish(_ray([*args, "--ray-transfer", "uint8"], address, tmp_path))
    assert code == 1, err
    got = _records(_joined(tmp_path / "out"))
    assert [r["path"] for r in got] == [r["path"] for r in exact]
    assert [r for r in got if "error" in r] == [r for r in exact if "error" in r]
    ok = [r for r in got if "error" not in r]
    assert [Path(r["path"]).stem for r in ok] == [Path(r["path"]).stem for r in want]
    assert_same_records(ok, [{**w, "path": g["path"]} for g, w in zip(ok, want, strict=True)])
    categories = ("general", "character", "copyright", "rating")
    moved = max(abs(g[c][t] - e[c][t]) for g, e in zip(got, exact, strict=True) if "error" not in e
                for c in categories for t in e[c])  # fmt: skip
    assert 0 < moved <= UINT8_BOUND
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["options"]["transfer"] == "uint8"
    code, err = _finish(_ray([*args, "--resume"], address, tmp_path))  # the default transfer, float32
    assert code == 2 and "written with other options" in err, err


def test_resume_checks_the_transfer(tmp_path):
    """A folder records its transfer; one written before the transfer was recorded counts as float32."""
    from i2v_cli.ray_engine import RayEngineError, RayJob, prepare_output

    inputs, model = ["a.png", "b.png"], {"source": "m", "sha256": "0"}
    job = RayJob(kind="tag", weights="w", out=str(tmp_path), fmt="jsonl", options={"top_k": None})
    prepare_output(job, inputs, model)
    manifest = tmp_path / "manifest.json"
    old = json.loads(manifest.read_text())
    assert old["options"] == {"top_k": None, "transfer": "float32", "precision": "fp32"}
    del old["options"]["transfer"], old["options"]["precision"]
    manifest.write_text(json.dumps(old))
    resume = RayJob(kind="tag", weights="w", out=str(tmp_path), fmt="jsonl", options={"top_k": None}, resume=True)
    assert prepare_output(resume, inputs, model)[1] == set()
    manifest.write_text(json.dumps(old))
    with pytest.raises(RayEngineError, match="written with other options"):
        prepare_output(RayJob(**{**resume.__dict__, "transfer": "uint8"}), inputs, model)


def test_parquet_shards_and_features(cluster, images, tag_weights, feature_weights, tmp_path):
    from i2v_cli.ray_engine import read_tag_records

    address, _ = cluster
    local = _records(_local_jsonl(images, tag_weights, tmp_path))
    tag = _ray(["tag", images, "-t", "0", "-w", tag_weights, "-f", "parquet", "-o", "pq"], address, tmp_path)
    assert _finish(tag)[0] == 1
    assert_same_records(list(read_tag_records(tmp_path / "pq")), local)

    runner = CliRunner()
    result = runner.invoke(
        cli, ["features", str(images), "-j", "0", "-w", str(feature_weights), "-o", str(tmp_path / "v.npy")]
    )
    assert result.exit_code == 1, result.output
    want = read_features(tmp_path / "v.npy")
    proc = _ray(["features", images, "-w", feature_weights, "--shard-size", "5", "-o", "feat"], address, tmp_path)
    code, err = _finish(proc)
    assert code == 1, err
    parts = [read_features(tmp_path / "feat" / s["file"]) for s in _shards(tmp_path / "feat")]
    assert [p for part in parts for p in part.paths] == want.paths
    # encode1 before its sigmoid: values up to about 10, so float32 sums of another batch grouping differ by ~1e-5
    np.testing.assert_allclose(np.concatenate([p.vectors for p in parts]), want.vectors, atol=1e-4, rtol=1e-5)
    names = [s["file"].replace(".npy", ".errors.jsonl") for s in _shards(tmp_path / "feat")]
    errors = [json.loads(line) for name in names for line in (tmp_path / "feat" / name).read_text().splitlines()]
    assert [record_path(e) for e in errors] == [f"{images}/{BROKEN}"]
    assert errors[0]["error"] == f"{images}/{SHOWN}: a text file, not an image"


def test_killed_network_worker_loses_and_duplicates_nothing(cluster, images, tag_weights, tmp_path):
    address, hold = cluster
    for f in hold.iterdir():
        f.unlink()
    local = _local_jsonl(images, tag_weights, tmp_path)
    (hold / "hold").write_text("2")  # the actor writes two shards, then waits before writing its third
    args = ["tag", images, "-t", "0", "-w", tag_weights, "--shard-size", "2", "--num-workers", "1", "-o", "out"]
    proc = _ray(args, address, tmp_path)
    try:
        holding = _wait_for("holding-*", hold, proc)
        pid = int(holding.name.split("-")[1])
        assert len(list((tmp_path / "out").glob("part-*.jsonl"))) == 2
        os.kill(pid, signal.SIGKILL)  # mid-run: its third shard computed, not written
    finally:
        (hold / "hold").unlink()
    code, err = _finish(proc)
    assert code == 1, err
    assert {f.name for f in hold.glob("actor-*")} - {f"actor-{pid}"}, "no actor took over from the killed one"
    assert_same_records(_records(_joined(tmp_path / "out")), _records(local))  # every input once, in order
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


def test_resume_finishes_an_interrupted_run(cluster, images, tag_weights, tmp_path):
    address, hold = cluster
    for f in hold.iterdir():
        f.unlink()
    local = _local_jsonl(images, tag_weights, tmp_path)
    (hold / "hold").write_text("3")
    args = ["tag", images, "-t", "0", "-w", tag_weights, "--shard-size", "2", "--num-workers", "1", "-o", "out"]
    proc = _ray(args, address, tmp_path)
    try:
        actor = int(_wait_for("holding-*", hold, proc).name.split("-")[1])
        proc.kill()  # the driver dies: the run is interrupted, three shards done
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 30  # Ray ends the dead driver's actors; make sure of it before going on
        while time.monotonic() < deadline and _alive(actor):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(actor, signal.SIGKILL)
    finally:
        (hold / "hold").unlink()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert len(list((tmp_path / "out").glob("part-*.jsonl"))) == 3

    # Shards finish in any order: the one with the file that is not an image (inputs 6-7) may be done already.
    failing = 0 if (tmp_path / "out" / "part-00003.jsonl").exists() else 1

    again = _finish(_ray(args, address, tmp_path))
    assert again[0] == 2 and "add --resume" in again[1]
    code, err = _finish(_ray([*args, "--resume"], address, tmp_path))
    assert code == failing, err  # a resumed run reports its own failures, as the local engine's --resume does
    assert f"i2v: ray: 7 images, {failing} failed" in err and "6 skipped" in err
    assert_same_records(_records(_joined(tmp_path / "out")), _records(local))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["errors"] == 1


def test_sigterm_keeps_the_work_and_odd_names_and_shard_sizes(cluster, images, tag_weights, tmp_path):
    """ray.init replaced i2v's SIGTERM handler (exit 15, no "terminated", Ray's dump); a folder or argument named in
    other than UTF-8 failed every run ("cannot reach the Ray cluster": Ray records both as strict UTF-8); a
    --shard-size whose reservation the cluster cannot hold waited for ever."""
    address, hold = cluster
    for f in hold.iterdir():
        f.unlink()
    odd = tmp_path / os.fsdecode(b"cwd-\xfe")
    odd.mkdir()
    args = ["tag", images, "-t", "0", "-w", tag_weights, "--shard-size", "2", "--num-workers", "1"]
    (hold / "hold").write_text("1")
    try:
        proc = _ray([*args, "-o", os.fsdecode(b"out-\xff")], address, odd)
        _wait_for("holding-*", hold, proc)
        proc.send_signal(signal.SIGTERM)
        code, err = _finish(proc)
    finally:
        (hold / "hold").unlink()
    assert code == 143 and "i2v: terminated (SIGTERM)" in err, err
    out = odd / os.fsdecode(b"out-\xff")
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    code, err = _finish(_ray([*args, "-o", os.fsdecode(b"out-\xff"), "--resume"], address, odd))
    assert code == 1 and "i2v: ray: 11 images, 1 failed" in err and "2 skipped (already in out-\\xff)" in err, err
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    # a shard size far beyond the inputs reserves for the inputs there are (it waited for ever on a 15-image run)
    code, err = _finish(_ray([*args[:-4], "--shard-size", "100000000", "-o", "big"], address, tmp_path))
    assert code == 1 and "i2v: ray: 13 images, 1 failed" in err, err
    # one shard of 200,000 inputs (the same file listed over and over) would need 240 GB: said, not waited for
    many = (str(images / "im00.png") + "\n") * 200_000
    proc = _ray(["tag", "-", "-w", tag_weights, "--shard-size", "200000", "-o", "huge"], address, tmp_path,
                stdin=subprocess.PIPE)  # fmt: skip
    try:
        _, err = proc.communicate(many, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("a shard the cluster cannot hold was waited for")
    assert proc.returncode == 2 and "--shard-size 200000: a decoding task needs" in err, err
    assert "use a smaller --shard-size" in err


def test_the_output_folder_is_checked_before_ray_is_reached(tmp_path, images):
    """A foreign manifest.json was a traceback on --resume; -o naming the inputs' folder wrote the shards among the
    images; --resume with another --precision mixed fp32 and bf16 records; a second run wrote into the folder of a
    run under way. All are refused before Ray is reached (the address here leads nowhere)."""
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from i2v_cli.atomic import folder_lock
    from i2v_cli.ray_engine import RayEngineError, RayJob, prepare_output, run_job

    inputs, model = [str(images / "im00.png")], {"source": "m", "sha256": "0"}

    def job(out, **kw):
        return RayJob(kind="tag", weights="w", out=str(out), fmt="jsonl", address="127.0.0.1:1", **kw)

    # an address where nothing listens: said at once (ray.init retried it for ever), no folder left to block a rerun
    with pytest.raises(RayEngineError, match=r"^cannot reach the Ray cluster 127\.0\.0\.1:1: Connection refused$"):
        next(run_job(job(tmp_path / "nowhere"), inputs, model))
    assert not (tmp_path / "nowhere").exists()
    for content in ("[1, 2]", '{"model": "abc"}', '{"format": "other"}'):
        (tmp_path / "f").mkdir(exist_ok=True)
        (tmp_path / "f" / "manifest.json").write_text(content)
        with pytest.raises(RayEngineError, match="is not the manifest of an i2v run"):
            next(run_job(job(tmp_path / "f", resume=True), inputs, model))
    with pytest.raises(RayEngineError, match=r"is the folder of inputs .*: the shards would lie among the images"):
        next(run_job(job(images), inputs, model))
    assert not (images / "manifest.json").exists()
    prepare_output(job(tmp_path / "p"), inputs, model)
    with pytest.raises(RayEngineError, match="written with other options"):
        prepare_output(job(tmp_path / "p", resume=True, precision="bf16"), inputs, model)
    busy = pytest.raises(RayEngineError, match=r"another i2v is writing into .*: wait for it to finish")
    with folder_lock(tmp_path / "p", wait=False), busy:  # a run under way (refused before a local Ray starts)
        next(run_job(RayJob(**{**job(tmp_path / "p", resume=True).__dict__, "address": None}), inputs, model))


def test_engine_options_are_checked(tag_weights, images, tmp_path, monkeypatch):
    runner = CliRunner()
    base = ["tag", str(images), "-w", str(tag_weights)]
    result = runner.invoke(cli, [*base, "--num-workers", "2"])
    assert result.exit_code == 2 and "--num-workers: for --engine ray only" in result.output
    result = runner.invoke(cli, [*base, "-f", "parquet"])
    assert result.exit_code == 2 and "--format parquet: for --engine ray only" in result.output
    result = runner.invoke(cli, [*base, "--ray-transfer", "uint8"])
    assert (result.exit_code, result.output) == (2, "Error: --ray-transfer: for --engine ray only\n")
    for command in ("tag", "features"):  # listed with the other Ray options
        text = runner.invoke(cli, [command, "-h"]).output
        assert text.index("Ray cluster (--engine ray):") < text.index("--ray-transfer [float32|uint8]")
    monkeypatch.setattr("i2v_cli.cli.ray_options.find_spec", lambda name: None)
    result = runner.invoke(cli, [*base, "--engine", "ray", "-o", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().endswith(
        "--engine ray needs Ray: pip install 'ray[data]' pyarrow (or, in the i2v checkout, pip install '.[ray]')"
    )
    if find_spec("ray") is None:
        return
    monkeypatch.undo()
    result = runner.invoke(cli, [*base, "--engine", "ray"])
    assert result.exit_code == 2 and "give -o FOLDER" in result.output
    # Local options that Ray cannot honour are refused before anything starts, never silently dropped.
    out = ["--engine", "ray", "-o", str(tmp_path / "o")]
    result = runner.invoke(cli, [*base, *out, "--workers", "2"])
    assert result.exit_code == 2 and "--workers: with --engine ray" in result.output
    result = runner.invoke(cli, [*base, *out, "--device", "cuda:1"])
    assert result.exit_code == 2 and "Ray gives each actor its GPU" in result.output
    result = runner.invoke(cli, [*base, *out, "--backend", "onnxruntime", "--precision", "bf16"])
    assert result.exit_code == 2 and "computes in fp32" in result.output
    assert not (tmp_path / "o").exists()
