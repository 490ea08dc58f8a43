"""What names a network in a run's records: the tensors' digest (:func:`i2v_cli.weights.tensors_digest`), so that a
weight file edited in place with its provenance kept is another network to resume, index and search, while a
caffemodel and its conversion stay the same one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from i2v_cli import weights
from i2v_cli.cli import cli
from i2v_cli.resume import job_file_for
from i2v_cli.store import same_weights

GOLDEN = Path(__file__).parent / "data" / "golden"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return d


def _edit_keeping_provenance(path: Path, key: str = "conv6_4.bias") -> None:
    """Rewrite ``path`` with one tensor changed and its i2v metadata (source, sha256) kept, as a user's own script
    that copies the metadata over would."""
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    key = key if key in tensors else sorted(k for k in tensors if k.endswith("bias"))[-1]
    tensors[key] = tensors[key] + 0.25
    weights.save_safetensors(tensors, path, meta)


def _run(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_resume_refuses_weights_edited_with_their_provenance_kept(tmp_path, folder, tag_weights):
    w = tmp_path / "w.safetensors"
    shutil.copy(tag_weights, w)
    out = tmp_path / "out.jsonl"
    assert _run("tag", "-j", "0", "-w", w, folder / "img0.png", "-o", out).exit_code == 0
    before = out.read_bytes()
    _edit_keeping_provenance(w)
    assert weights.load_weights(w)[1].sha256 == weights.load_weights(tag_weights)[1].sha256  # provenance kept
    result = _run("tag", "-j", "0", "-w", w, folder, "-o", out, "--resume")
    assert result.exit_code == 2, result.output
    assert "other tensors: edited since?" in result.stderr
    assert out.read_bytes() == before


def test_a_caffemodel_and_its_conversion_are_one_network_to_resume(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    caffemodel = GOLDEN / "models" / "tag_v2.caffemodel"  # what tag_weights was converted from
    assert _run("tag", "-j", "0", "-w", caffemodel, folder / "img0.png", "-o", out).exit_code == 0
    result = _run("tag", "-j", "0", "-w", tag_weights, folder, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


def test_a_job_of_an_earlier_version_resumes_by_its_file_digest(tmp_path, folder, tag_weights):
    out = tmp_path / "out.jsonl"
    assert _run("tag", "-j", "0", "-w", tag_weights, folder / "img0.png", "-o", out).exit_code == 0
    job_file = job_file_for(out)
    job = json.loads(job_file.read_text())
    assert job["model"]["tensors"].startswith("sha256:")
    del job["model"]["tensors"]  # as the versions before it wrote them
    with open(job_file, "r+") as f:  # in place: the lock lives on its inode
        f.truncate(0)
        f.write(json.dumps(job))
    result = _run("tag", "-j", "0", "-w", tag_weights, folder, "-o", out, "--resume")
    assert result.exit_code == 0, result.output
    assert len(out.read_text().splitlines()) == 3


def test_index_refuses_weights_edited_in_place(tmp_path, folder, tag_weights, feature_weights):
    fw = tmp_path / "f.safetensors"
    shutil.copy(feature_weights, fw)
    db = tmp_path / "c.db"
    common = ["index", "--db", db, "--tag-weights", tag_weights, "--feature-weights", fw, "-j", "0"]
    assert _run(*common, folder).exit_code == 0
    _edit_keeping_provenance(fw, "encode1.bias")
    (folder / "img3.png").write_bytes((folder / "img0.png").read_bytes()[:-1] + b"\0")
    result = _run(*common, folder)
    assert result.exit_code == 2, result.output
    assert "other tensors: edited since?" in result.stderr


def test_the_digest_is_remembered_while_the_file_is_unchanged(tmp_path, tag_weights, monkeypatch):
    w = tmp_path / "w.safetensors"
    shutil.copy(tag_weights, w)
    calls = []
    real = weights.tensors_digest
    monkeypatch.setattr(weights, "tensors_digest", lambda sd: calls.append(1) or real(sd))
    first = weights.load_weights(w)[1].tensors
    assert weights.load_weights(w)[1].tensors == first and len(calls) == 1  # taken from the record
    # Bytes changed in place, size and modification time put back: the change time still moves.
    st = w.stat()
    data = bytearray(w.read_bytes())
    data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x00\x00\x80\x3f"
    with open(w, "r+b") as f:
        f.write(data)
    os.utime(w, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.stat().st_size == st.st_size and w.stat().st_mtime_ns == st.st_mtime_ns
    again = weights.load_weights(w)[1].tensors
    assert len(calls) == 2 and again != first


def test_same_weights_compares_tensors_when_both_know_them() -> None:
    a = {"source": "x", "sha256": "s", "tensors": "sha256:1"}
    assert same_weights(a, {**a})
    assert not same_weights(a, {**a, "tensors": "sha256:2"})  # edited in place, provenance kept
    assert same_weights(a, {"source": "y", "sha256": "t", "tensors": "sha256:1"})  # a caffemodel and its conversion
    assert same_weights({"source": "x", "sha256": "s"}, a)  # an earlier version's record: by sha256
    assert not same_weights({"source": "x", "sha256": "other"}, a)


def test_serve_refuses_feature_weights_edited_in_place(tmp_path, folder, tag_weights, feature_weights):
    """It compared the sha256 only: uploads' similarities were computed by another network than the index's."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    fw = tmp_path / "f.safetensors"
    shutil.copy(feature_weights, fw)
    db = tmp_path / "c.db"
    assert (
        _run("index", folder, "--db", db, "--tag-weights", tag_weights, "--feature-weights", fw, "-j", "0").exit_code
        == 0
    )
    _edit_keeping_provenance(fw, "encode1.bias")
    result = _run("serve", "--db", db, "--port", "0", "--tag-weights", tag_weights, "--feature-weights", fw)
    assert result.exit_code == 2, result.output
    assert "other tensors: edited since?" in result.stderr


def test_an_index_of_an_earlier_version_is_not_stamped_with_unverified_tensors(tmp_path, folder, tag_weights,
                                                                                feature_weights):  # fmt: skip
    """A run that computed nothing recorded the (edited) weights' tensors as the index's: its rows were made by the
    earlier weights, which were then refused."""
    import sqlite3

    fw = tmp_path / "f.safetensors"
    shutil.copy(feature_weights, fw)
    db = tmp_path / "c.db"
    common = ["index", folder, "--db", db, "--tag-weights", tag_weights, "-j", "0", "--feature-weights"]
    assert _run(*common, fw).exit_code == 0
    con = sqlite3.connect(db)
    for key in ("tag_model", "feature_model"):  # as an earlier version recorded them
        (value,) = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        model = json.loads(value)
        del model["tensors"]
        con.execute("UPDATE meta SET value = ? WHERE key = ?", (json.dumps(model), key))
    con.commit()
    con.close()
    edited = tmp_path / "edited.safetensors"
    shutil.copy(fw, edited)
    _edit_keeping_provenance(edited, "encode1.bias")
    assert _run(*common, edited).exit_code == 0  # by sha256, as before: nothing to compute
    assert _run(*common, fw).exit_code == 0  # the weights that made the rows are still the index's
