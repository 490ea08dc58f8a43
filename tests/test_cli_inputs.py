"""`i2v tag` with inputs a new user or an attacker would give: mistyped paths, folders that cannot be read,
linked folders, files that are not images, files that make Pillow warn (issue 13, points 2, 3 and 5)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from i2v_cli.cli import cli


def run(*args, weights, input=None):
    return CliRunner().invoke(cli, ["tag", "--workers", "0", "--weights", str(weights), *map(str, args)], input=input)


@pytest.fixture
def images(tmp_path, golden):
    folder = tmp_path / "illustrations"
    folder.mkdir()
    for i, src in enumerate(["sq/img000.png", "mixed/img000.jpg"]):
        shutil.copy(golden / "images" / src, folder / f"im{i + 1}{src[-4:]}")
    return folder


def test_mistyped_folder_is_a_usage_error_and_no_output_is_made(images, tag_weights, tmp_path):
    out = tmp_path / "tags.json"
    result = run(tmp_path / "ilustrations", "-o", out, weights=tag_weights)
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: no such file or folder: {str(tmp_path / 'ilustrations')!r} (did you mean {str(images)!r}?)\n"
    )
    assert not out.exists() and result.stdout == ""


def test_missing_path_among_existing_ones_stops_before_anything_runs(images, tag_weights, tmp_path):
    out = tmp_path / "tags.jsonl"
    result = run(images / "im1.png", tmp_path / "nope.png", "-o", out, weights=tag_weights)
    assert result.exit_code == 2 and "no such file or folder: " in result.stderr and "nope.png" in result.stderr
    assert not out.exists()


def test_missing_paths_from_stdin_are_error_records(images, tag_weights, tmp_path):
    listing = f"{images / 'im1.png'}\n{tmp_path / 'deleted.png'}\n"
    result = run("-", weights=tag_weights, input=listing)
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert "general" in records[0] and records[1] == {
        "path": str(tmp_path / "deleted.png"),
        "error": f"{tmp_path / 'deleted.png'}: no such file",
    }


def _refuse_scandir(monkeypatch, *refused) -> None:
    """os.scandir fails for ``refused`` as for a folder without read permission (which root could read)."""
    real = os.scandir
    blocked = {os.path.realpath(p) for p in refused}

    def scandir(path="."):
        if os.path.realpath(path) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_unreadable_folders_get_records_the_rest_is_processed(images, tag_weights, tmp_path, monkeypatch):
    (tmp_path / "locked").mkdir()
    (images / "sub").mkdir()
    shutil.copy(images / "im1.png", images / "sub" / "deep.png")
    _refuse_scandir(monkeypatch, tmp_path / "locked", images / "sub")
    result = run(tmp_path / "locked", images, "-r", weights=tag_weights)
    assert result.exit_code == 1, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [
        str(tmp_path / "locked"),
        str(images / "im1.png"),
        str(images / "im2.jpg"),
        str(images / "sub"),
    ]
    assert records[0]["error"] == f"{tmp_path / 'locked'}: cannot read the folder (Permission denied)"
    assert records[3]["error"] == f"{images / 'sub'}: cannot read the folder (Permission denied)"
    assert "general" in records[1] and "general" in records[2]
    assert "Traceback" not in result.output


def test_recursive_follows_a_linked_folder(images, tag_weights, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(images / "im1.png", outside / "linked.png")
    (images / "link").symlink_to(outside)
    (images / "loop").symlink_to(images)
    result = run(images, "-r", weights=tag_weights)
    assert result.exit_code == 0, result.output
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert paths == [str(images / "im1.png"), str(images / "im2.jpg"), str(images / "link" / "linked.png")]


def test_a_text_file_named_on_the_command_line_hints_at_stdin(images, tag_weights, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{images / 'im1.png'}\n")
    result = run(listing, weights=tag_weights)
    assert result.exit_code == 1
    (record,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert record["error"] == (
        f"{listing}: a text file, not an image (to read image paths listed in a file use `i2v tag - < FILE`)"
    )


def test_pillow_warnings_stay_off_stderr(images, tag_weights):
    """In a process of its own: under pytest, warnings are recorded by pytest instead of printed."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010E] = "x" * 50
    raw = bytearray(exif.tobytes())
    at = raw.find(struct.pack(">H", 0x010E))
    raw[at + 4 : at + 8] = struct.pack(">I", 100_000)  # "Tag data larger than file": Pillow warns
    Image.new("RGB", (32, 16), (200, 10, 10)).save(images / "im3.jpg", exif=bytes(raw))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    result = subprocess.run(
        [sys.executable, "-m", "i2v_cli", "tag", str(images), "--workers", "0", "--weights", str(tag_weights)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert "Warning" not in result.stderr and "Tag data" not in result.stderr, result.stderr


@pytest.mark.parametrize("command", ["tag", "features", "index", "similar", "calibrate"])
def test_dash_with_standard_input_closed_is_a_usage_error(command, tag_weights, feature_weights, golden, tmp_path):
    """`i2v tag - <&-`: Python then has no sys.stdin, and `sys.stdin.buffer` was an AttributeError traceback."""
    if command == "similar":  # it reads its index first
        image = str(golden / "images" / "sq" / "img000.png")
        made = CliRunner().invoke(cli, ["features", image, "-w", str(feature_weights), "-o", str(tmp_path / "v.npy")])
        assert made.exit_code == 0, made.output
    args = {
        "tag": ["tag", "-", "-w", str(tag_weights)],
        "features": ["features", "-", "-w", str(tag_weights)],
        "index": ["index", "-", "--db", str(tmp_path / "x.db")],
        "similar": ["similar", "-", "-i", str(tmp_path / "v.npy")],
        "calibrate": ["weights", "calibrate", "-", "-o", str(tmp_path / "c.npz")],
    }[command]
    proc = subprocess.run([sys.executable, "-m", "i2v_cli", *args], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.close(0), cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith(
        "'-' reads paths from standard input, which is closed: pipe the paths in, or give them"
    )
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.db").exists()


def test_dash_with_standard_input_open_for_writing_only_is_a_usage_error(tag_weights, tmp_path):
    """`i2v tag - 0>file`: reading it is EBADF, which was a traceback (features, index, calibrate) or blamed on
    the weights (tag)."""
    with open(tmp_path / "wo.txt", "wb") as write_only:
        proc = subprocess.run([sys.executable, "-m", "i2v_cli", "tag", "-", "-w", str(tag_weights)], stdin=write_only,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.strip().endswith("cannot read the paths from '-' (Bad file descriptor)")


def test_a_parquet_list_that_is_not_one_is_a_usage_error(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from i2v_cli.errors import InputError
    from i2v_cli.ray_engine import expand_ray_inputs

    (tmp_path / "bad.parquet").write_text("x")
    with pytest.raises(InputError, match=r"bad\.parquet: not a Parquet list of paths"):
        expand_ray_inputs([str(tmp_path / "bad.parquet")])
    pq.write_table(pa.table({"path": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(InputError, match=r"ints\.parquet: its path column holds values that are not file names"):
        expand_ray_inputs([str(tmp_path / "ints.parquet")])


@pytest.mark.parametrize(
    "args",
    [
        ["tag", "-t", "nan", "x.png"],
        ["tag", "--general-threshold", "NaN", "x.png"],
        ["search", "--db", "x.db", "-t", "nan", "solo"],
        ["export", "--db", "x.db", "--to", "xmp", "-t", "nan"],
        ["dupes", "--db", "x.db", "-s", "nan"],
        ["serve", "--max-wait-ms", "nan"],
        ["serve", "--max-wait-ms", "inf"],
        ["serve", "--timeout", "inf"],
        ["serve", "--max-upload-mb", "nan"],
        ["tag", "--engine", "ray", "--gpus-per-worker", "nan", "x.png"],
    ],
)
def test_nan_and_infinity_are_not_numbers_to_options(args):
    """click's FloatRange let NaN through (no comparison with it fails): `dupes -s nan` and `search -t nan` ran
    and found nothing, `tag -t nan` wrote records without a tag, and a server waited for ever for a batch."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "is not a finite number" in result.stderr and result.stderr.count("Error:") == 1
