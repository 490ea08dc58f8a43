"""`i2v tag` through Click's CliRunner: formats, thresholds, errors and exit codes, exact outputs."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from i2v_cli.cli import cli
from i2v_cli.tags import load_tag_list

TAGS = load_tag_list()


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture
def images(tmp_path, golden):
    """Three 224x224 golden images and two mixed ones, in a folder."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, src in enumerate(
        ["sq/img000.png", "sq/img001.png", "mixed/img000.jpg", "sq/img002.png", "mixed/img004.png"]
    ):
        shutil.copy(golden / "images" / src, folder / f"im{i + 1}{src[-4:]}")
    return folder


def run(runner, *args, weights, input=None):
    return runner.invoke(cli, ["tag", "--workers", "0", "--weights", str(weights), *map(str, args)], input=input)


def test_json_scores_equal_the_original_pipeline(runner, tag_weights, golden, tmp_path):
    out = tmp_path / "tags.json"
    result = run(runner, golden / "images" / "sq", "--threshold", "0", "-o", out, weights=tag_weights)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    records = json.loads(out.read_text())
    assert [r["path"] for r in records] == [str(golden / "images" / "sq" / f"img00{i}.png") for i in range(3)]
    expected = np.load(golden / "expected" / "tag_v2.npy")[:3]
    for record, row in zip(records, expected, strict=True):
        assert list(record) == ["path", "general", "character", "copyright", "rating"]
        scores = {**record["general"], **record["character"], **record["copyright"], **record["rating"]}
        assert len(scores) == 1539
        np.testing.assert_allclose([scores[t] for t in TAGS], row, atol=1e-4, rtol=0)


def test_thresholds_per_category(runner, tag_weights, images):
    result = run(
        runner, images, "--threshold", "0.3", "--character-threshold", "0.6", "-f", "jsonl", weights=tag_weights
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 5
    for r in records:
        assert all(s >= 0.3 for s in r["general"].values()) and all(s >= 0.3 for s in r["copyright"].values())
        assert all(s >= 0.6 for s in r["character"].values())
        assert list(r["rating"]) and sorted(r["rating"]) == ["explicit", "questionable", "safe"]
        for cat in ("general", "character", "copyright", "rating"):
            assert list(r[cat].values()) == sorted(r[cat].values(), reverse=True)
    everything = [json.loads(line) for line in run(runner, images, "-t", "0", weights=tag_weights).stdout.splitlines()]
    for r, full in zip(records, everything, strict=True):
        assert set(r["general"]) == {t for t, s in full["general"].items() if s >= 0.3}
        assert set(r["character"]) == {t for t, s in full["character"].items() if s >= 0.6}


def test_top_k(runner, tag_weights, images):
    result = run(runner, images, "--top-k", "3", weights=tag_weights)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(len(r[c]) == 3 for r in records for c in ("general", "character", "copyright", "rating"))


def test_csv_loads_with_a_csv_reader(runner, tag_weights, images):
    result = run(runner, images, "--top-k", "2", "--format", "csv", weights=tag_weights)
    assert result.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "category", "tag", "score", "error", "path_b64"]
    assert len(rows) == 5 * (2 + 2 + 2 + 3)
    assert {r["category"] for r in rows} == {"general", "character", "copyright", "rating"}
    assert all(0.0 <= float(r["score"]) <= 1.0 and r["error"] == "" for r in rows)


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 0), (2, 2), (16, 0)])
def test_results_do_not_depend_on_batch_size_or_workers(runner, tag_weights, images, batch_size, workers):
    def scores(*args):
        out = runner.invoke(cli, ["tag", str(images), "-t", "0", "--weights", str(tag_weights), *args]).stdout
        return [
            {k: v for c in ("general", "character", "copyright", "rating") for k, v in json.loads(line)[c].items()}
            for line in out.splitlines()
        ]

    reference = scores("--batch-size", "5", "--workers", "0")
    got = scores("--batch-size", str(batch_size), "--workers", str(workers))
    assert len(got) == len(reference) == 5
    for a, b in zip(got, reference, strict=True):
        np.testing.assert_allclose([a[t] for t in TAGS], [b[t] for t in TAGS], atol=1e-5, rtol=0)


def test_result_does_not_depend_on_other_images(runner, tag_weights, images):
    alone = json.loads(run(runner, images / "im3.jpg", "-t", "0", weights=tag_weights).stdout)
    together = [json.loads(line) for line in run(runner, images, "-t", "0", weights=tag_weights).stdout.splitlines()]
    np.testing.assert_allclose(list(alone["general"].values()), list(together[2]["general"].values()), atol=1e-5)


def test_a_broken_file_gets_an_error_record_and_exit_1(runner, tag_weights, images):
    (images / "im2b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    result = run(runner, images, weights=tag_weights)
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"].rsplit("/", 1)[1] for r in records] == [
        "im1.png",
        "im2.png",
        "im2b.png",
        "im3.jpg",
        "im4.png",
        "im5.png",
    ]
    assert set(records[2]) == {"path", "error"} and "im2b.png" in records[2]["error"]
    assert all("general" in r for i, r in enumerate(records) if i != 2)
    assert "im2b.png" in result.stderr and "1 of 6 inputs failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_paths_from_stdin(runner, tag_weights, images):
    listing = f"{images / 'im3.jpg'}\n{images / 'im1.png'}\n"
    result = run(runner, "-", weights=tag_weights, input=listing)
    assert result.exit_code == 0
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [
        str(images / "im3.jpg"),
        str(images / "im1.png"),
    ]
    result = run(runner, "-", "-0", weights=tag_weights, input=f"{images / 'im1.png'}\0")
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(images / "im1.png")]


def test_no_weights_names_the_command_that_gets_them(runner, images, tmp_path, monkeypatch):
    monkeypatch.delenv("I2V_WEIGHTS", raising=False)
    monkeypatch.setenv("I2V_HOME", str(tmp_path / "empty-cache"))
    result = runner.invoke(cli, ["tag", str(images)])
    assert result.exit_code == 2
    assert "i2v weights download" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_feature_model_where_tag_model_is_needed(runner, feature_weights, images):
    result = run(runner, images, weights=feature_weights)
    assert result.exit_code == 2
    assert "feature" in result.stderr and str(feature_weights.name) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threshold", "1.5"], "Invalid value for '--threshold'"),
        (["--format", "xml"], "Invalid value for '--format'"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda:7"], "device cuda:7"),
        (["-o", "/nonexistent-dir/x.json"], "cannot write /nonexistent-dir/x.json"),
    ],
)
def test_usage_errors_exit_2_in_one_line(runner, tag_weights, images, args, message):
    result = run(runner, images, *args, weights=tag_weights)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_folder_is_a_usage_error(runner, tag_weights, tmp_path):
    result = run(runner, tmp_path, weights=tag_weights)
    assert result.exit_code == 2 and "no images in folder" in result.stderr


def test_every_command_has_help():
    runner = CliRunner()
    for args in (
        ["-h"],
        ["tag", "-h"],
        ["weights", "-h"],
        ["weights", "convert", "-h"],
        ["weights", "download", "-h"],
        ["weights", "info", "-h"],
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0 and "Usage:" in result.output
    for name, command in cli.commands.items():
        assert command.help, name
        for param in command.params:
            if isinstance(param, __import__("click").Option):
                assert param.help, f"{name} {param.name}"


def test_python_dash_m_and_console_script(tag_weights, golden, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "i2v_cli",
            "tag",
            str(golden / "images" / "sq" / "img000.png"),
            "--weights",
            str(tag_weights),
            "--workers",
            "0",
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["path"].endswith("img000.png") and len(record["general"]) == 1
    # No progress bar when stderr is not a terminal: only the closing summary line.
    assert proc.stderr.startswith("i2v: tagged 1 of 1 images in ") and proc.stderr.count("\n") == 1
