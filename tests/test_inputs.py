"""Finding inputs: folders in natural order, extensions in any case, globs, stdin lists."""

from __future__ import annotations

import io
import os
from pathlib import Path

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


def test_mistyped_path_is_a_usage_error_naming_it(tmp_path):
    """Issue 13.3: `i2v tag ./ilustrations` is a usage error (it was kept and became an error record)."""
    (tmp_path / "illustrations").mkdir()
    typo = str(tmp_path / "ilustrations")
    with pytest.raises(InputError) as info:
        expand_inputs([typo])
    assert str(info.value) == f"no such file or folder: {typo!r} (did you mean {str(tmp_path / 'illustrations')!r}?)"
    with pytest.raises(InputError, match=r"^no such file or folder: '[^']*gone\.png'$"):
        expand_inputs([str(tmp_path / "gone.png")])


def test_one_missing_among_several_stops_before_anything_runs(tmp_path):
    touch(tmp_path, "a.png")
    names = [str(tmp_path / n) for n in ("x1.png", "a.png", "x2.png", "x3.png", "x4.png")]
    with pytest.raises(InputError) as info:
        expand_inputs(names)
    missing = ", ".join(repr(n) for n in names[:1] + names[2:4])
    assert str(info.value) == f"no such files or folders: {missing} and 1 more"


def test_existing_non_images_and_dangling_links_are_kept_for_error_records(tmp_path):
    touch(tmp_path, "notes.txt")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (tmp_path / "sub" / "file.png").parent.mkdir()
    names = [str(tmp_path / "notes.txt"), str(tmp_path / "gone.png"), str(tmp_path / "sub" / "f[1].png")]
    (tmp_path / "sub" / "f[1].png").write_bytes(b"")  # glob characters, but the file exists: kept as named
    assert expand_inputs(names) == names


def test_keep_missing_is_for_callers_that_look_names_up_elsewhere(tmp_path):
    """`i2v similar` looks a query up in its index first: one that is not there fails alone."""
    assert expand_inputs([str(tmp_path / "gone.png")], keep_missing=True) == [str(tmp_path / "gone.png")]


def test_missing_paths_read_from_stdin_are_kept(tmp_path):
    """A list from find may name files deleted since: they must not stop the run."""
    got = expand_inputs(["-"], stdin=io.BytesIO(b"/nonexistent/a.png\n/nonexistent/b.png\n"))
    assert got == ["/nonexistent/a.png", "/nonexistent/b.png"]


def test_stdin_lines_and_nul(tmp_path):
    raw = b"a.png\r\nb c.png\n\n\xff.png\n"
    assert list(read_path_list(io.BytesIO(raw))) == ["a.png", "b c.png", os.fsdecode(b"\xff.png")]
    assert list(read_path_list(io.BytesIO(b"a\nb.png\0c.png\0"), nul=True)) == ["a\nb.png", "c.png"]
    touch(tmp_path, "first.png")
    got = expand_inputs([str(tmp_path / "first.png"), "-"], stdin=io.BytesIO(b"x.png\n"))
    assert got == [str(tmp_path / "first.png"), "x.png"]


def test_find_print0_output_read_without_nul_is_a_usage_error_saying_so():
    """Read a line at a time, the whole list was one path holding NUL bytes: os.lstat raised ValueError, a
    traceback (in a worker: 'Caught ValueError in DataLoader worker process')."""
    with pytest.raises(
        InputError, match=r"^the paths read from '-' hold NUL bytes, .*`find -print0` writes them\) add -0$"
    ):
        expand_inputs(["-"], stdin=io.BytesIO(b"/tmp/a.png\0/tmp/b.png\0"))
    with pytest.raises(InputError, match=r"^the paths read from list.txt hold NUL bytes"):
        list(read_path_list(io.BytesIO(b"a.png\0"), source="list.txt"))


def test_no_inputs():
    with pytest.raises(InputError, match="no input images"):
        expand_inputs(["-"], stdin=io.BytesIO(b""))


# --------------------------------------------------------------------------------------------------------
# Folders that cannot be read, symbolic links (issue 13.2)


def _refuse_scandir(monkeypatch, *refused: Path) -> None:
    """Make os.scandir fail as for a folder without read permission, for ``refused`` only: root can read any
    folder, so a real chmod cannot test this everywhere."""
    real = os.scandir
    blocked = {os.path.realpath(p) for p in refused}

    def scandir(path="."):
        if os.path.realpath(path) in blocked:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("recursive", [False, True])
def test_named_folder_that_cannot_be_read_is_kept_for_an_error_record(tmp_path, monkeypatch, recursive):
    touch(tmp_path, "locked/a.png", "open/b.png")
    _refuse_scandir(monkeypatch, tmp_path / "locked")
    got = expand_inputs([str(tmp_path / "locked"), str(tmp_path / "open")], recursive=recursive)
    assert got == [str(tmp_path / "locked"), str(tmp_path / "open" / "b.png")]
    # Alone, it is still an input (an error record), not "no images in folder".
    assert expand_inputs([str(tmp_path / "locked")], recursive=recursive) == [str(tmp_path / "locked")]


def test_recursive_walk_lists_a_sub_folder_that_cannot_be_read(tmp_path, monkeypatch):
    touch(tmp_path, "a/1.png", "a/locked/2.png", "b/3.png")
    _refuse_scandir(monkeypatch, tmp_path / "a" / "locked")
    got = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path)], recursive=True)]
    assert got == ["a/1.png", "a/locked", "b/3.png"]


def test_unreadable_folder_decodes_to_an_error_naming_it(tmp_path, monkeypatch):
    from i2v_cli.decode import open_image
    from i2v_cli.errors import ImageDecodeError

    (tmp_path / "locked").mkdir()
    _refuse_scandir(monkeypatch, tmp_path / "locked")
    with pytest.raises(ImageDecodeError) as info:
        open_image(str(tmp_path / "locked"))
    assert str(info.value) == f"{tmp_path / 'locked'}: cannot read the folder (Permission denied)"


def test_real_unreadable_folders(tmp_path):
    touch(tmp_path, "locked/a.png", "tree/ok.png", "tree/sub/b.png")
    for folder in (tmp_path / "locked", tmp_path / "tree" / "sub"):
        folder.chmod(0)
    try:
        if os.access(tmp_path / "locked", os.R_OK):
            pytest.skip("running as a user (root) who can read a folder without read permission")
        assert expand_inputs([str(tmp_path / "locked")]) == [str(tmp_path / "locked")]
        got = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "tree")], recursive=True)]
        assert got == ["tree/ok.png", "tree/sub"]
        from i2v_cli.decode import open_image
        from i2v_cli.errors import ImageDecodeError

        with pytest.raises(ImageDecodeError, match=r"locked: cannot read the folder \(Permission denied\)$"):
            open_image(str(tmp_path / "locked"))
    finally:
        for folder in (tmp_path / "locked", tmp_path / "tree" / "sub"):
            folder.chmod(0o755)


def test_recursive_follows_linked_folders_once(tmp_path):
    touch(tmp_path, "tree/a.png", "tree/real/b.png", "elsewhere/c.png")
    (tmp_path / "tree" / "0link").symlink_to(tmp_path / "tree" / "real")  # sorts before the real folder
    (tmp_path / "tree" / "loop").symlink_to(tmp_path / "tree")  # back up: would never end
    (tmp_path / "tree" / "out").symlink_to(tmp_path / "elsewhere")  # outside the tree: followed
    got = [os.path.relpath(p, tmp_path) for p in expand_inputs([str(tmp_path / "tree")], recursive=True)]
    assert got == ["tree/a.png", "tree/out/c.png", "tree/real/b.png"]
    # Without --recursive, sub-folders (linked or not) are not entered.
    assert [os.path.basename(p) for p in expand_inputs([str(tmp_path / "tree")])] == ["a.png"]


def test_natural_key():
    names = ["a10", "a2", "A1", "b", "a2x"]
    assert sorted(names, key=natural_key) == ["A1", "a2", "a2x", "a10", "b"]
