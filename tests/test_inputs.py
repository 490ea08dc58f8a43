"""Finding inputs: folders in natural order, extensions in any case, globs, stdin lists."""

from __future__ import annotations

import io
import os

import pytest

from i2v_cli.errors import InputError
from i2v_cli.inputs import expand_inputs, natural_key, read_path_list


def touch(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_folder_natural_order_and_case_insensitive_extensions(tmp_path):
    touch(tmp_path, "img10.png", "img2.JPG", "img1.Png", "notes.txt", "sub/img0.png")
    got = expand_inputs([str(tmp_path)])
    assert [os.path.basename(p) for p in got] == ["img1.Png", "img2.JPG", "img10.png"]


def test_recursive(tmp_path):
    touch(tmp_path, "b/2.png", "a/10.png", "a/9.png", "top.webp")
    got = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path)], recursive=True)]
    assert got == ["a/9.png", "a/10.png", "b/2.png", "top.webp"]


def test_empty_folder_is_a_usage_error_listing_extensions(tmp_path):
    with pytest.raises(InputError, match=r"no images in folder .*--recursive.*\.jpg"):
        expand_inputs([str(tmp_path)])


def test_glob(tmp_path):
    touch(tmp_path, "x2.png", "x10.png", "y.png")
    got = expand_inputs([str(tmp_path / "x*.png")])
    assert [os.path.basename(p) for p in got] == ["x2.png", "x10.png"]
    with pytest.raises(InputError, match="no file matches"):
        expand_inputs([str(tmp_path / "z*.png")])


def test_missing_file_is_kept_for_an_error_record(tmp_path):
    assert expand_inputs([str(tmp_path / "gone.png")]) == [str(tmp_path / "gone.png")]


def test_stdin_lines_and_nul():
    raw = b"a.png\r\nb c.png\n\n\xff.png\n"
    assert list(read_path_list(io.BytesIO(raw))) == ["a.png", "b c.png", os.fsdecode(b"\xff.png")]
    assert list(read_path_list(io.BytesIO(b"a\nb.png\0c.png\0"), nul=True)) == ["a\nb.png", "c.png"]
    got = expand_inputs(["first.png", "-"], stdin=io.BytesIO(b"x.png\n"))
    assert got == ["first.png", "x.png"]


def test_no_inputs():
    with pytest.raises(InputError, match="no input images"):
        expand_inputs(["-"], stdin=io.BytesIO(b""))


def test_natural_key():
    names = ["a10", "a2", "A1", "b", "a2x"]
    assert sorted(names, key=natural_key) == ["A1", "a2", "a2x", "a10", "b"]
