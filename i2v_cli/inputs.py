"""Finding the images to process: files, folders, glob patterns and lists of paths read from a stream."""

from __future__ import annotations

import difflib
import glob
import os
import re
import stat
from collections.abc import Iterable, Iterator
from typing import IO

from .errors import InputError

#: Extensions (lower case) that a folder walk picks up; a file named explicitly is tried whatever its name.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"})
_GLOB_CHARS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``img2`` before ``img10`` (numbers compare as numbers, the rest case-folded)."""
    return tuple((0, int(p)) if p.isdigit() else (1, p.casefold()) for p in _DIGITS.split(path) if p)


def is_image_name(path: str) -> bool:
    """Whether a file name has one of the supported image extensions, in any letter case."""
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def walk_folder(folder: str, recursive: bool = False) -> list[str]:
    """The image files in ``folder`` (and its sub-folders when ``recursive``) in natural sort order.

    ``recursive`` follows symbolic links to folders, visiting each real folder once (by device and inode),
    so a link back up the tree cannot loop; real sub-folders are walked before linked ones, so an image
    reachable both ways is listed under its real path. A sub-folder named like an image is listed, and so
    is a folder that cannot be read (``folder`` itself included): decoding either gives an error record
    naming it (see :func:`~i2v_cli.decode.open_image`), instead of the folder vanishing silently.
    """
    found: list[str] = []
    visited: set[tuple[int, int]] = set()
    real: list[str] = [folder]  # folders to list: real ones first
    linked: list[str] = []  # symbolic links to folders, followed once no real folder is left
    _visit(folder, visited)
    while real or linked:
        if not real:  # a linked folder is walked only if its target was not walked yet
            target = linked.pop(0)
            if _visit(target, visited):
                real.append(target)
            continue
        current = real.pop()
        try:
            with os.scandir(current) as listing:
                entries = list(listing)
        except OSError:
            found.append(current)  # unreadable: an error record will name it
            continue
        for entry in entries:
            if not _is_folder(entry):
                if is_image_name(entry.name):
                    found.append(entry.path)
            elif not recursive:
                if is_image_name(entry.name):
                    found.append(entry.path)  # a folder named like an image: its error record says so
            elif not entry.is_symlink():
                if _visit(entry.path, visited):
                    real.append(entry.path)
            else:
                linked.append(entry.path)
    return sorted(found, key=natural_key)


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """Whether an entry is a folder or a symbolic link to one (a link that cannot be followed is not)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _visit(path: str, visited: set[tuple[int, int]]) -> bool:
    """Mark the real folder at ``path`` visited; whether it was new (a folder that cannot be looked at is
    new: listing it will fail and report it)."""
    try:
        st = os.stat(path)
    except OSError:
        return True
    key = (st.st_dev, st.st_ino)
    if key in visited:
        return False
    visited.add(key)
    return True


def read_path_list(stream: IO[bytes], nul: bool = False, source: str = "'-'") -> Iterator[str]:
    """Paths from a byte stream (``source`` names it in messages), one a line or NUL-separated (``find -print0``);
    bytes that are not UTF-8 survive through the file system encoding's surrogate escapes. Lines holding a NUL
    byte, which no file name can, are an InputError: NUL-separated paths read without ``nul``, most likely."""
    try:
        data = stream.read()
    except OSError as exc:  # standard input opened for writing only (0>file), a folder, ...
        raise InputError(f"cannot read the paths from {source} ({exc.strerror or exc})") from None
    if not nul and b"\0" in data:
        raise InputError(
            f"the paths read from {source} hold NUL bytes, which no file name can: for NUL-separated paths (as "
            "`find -print0` writes them) add -0"
        )
    parts = data.split(b"\0") if nul else data.splitlines()
    for part in parts:
        if not nul:
            part = part.rstrip(b"\r")
        if part:
            yield os.fsdecode(part)


def expand_inputs(
    specs: Iterable[str],
    *,
    recursive: bool = False,
    stdin: IO[bytes] | None = None,
    nul: bool = False,
    keep_missing: bool = False,
) -> list[str]:
    """Turn command-line inputs into the ordered list of image paths to process.

    A folder gives its images in natural order (see :func:`walk_folder`; a folder that cannot be read is
    kept, so that it gets an error record naming it); a glob pattern its matches; ``-`` the paths read from
    ``stdin``, kept as they are (a list from ``find`` may name files deleted since, and those must not stop
    the run: each gets an error record). Any other name that exists is kept as is, even if it is not an
    image, a dangling symbolic link or unreadable, so that it gets an error record for that file.

    Raises InputError, before anything is processed, when a name given here does not exist (a mistyped
    path, naming every such input; ``keep_missing`` keeps it instead, for a caller that looks names up
    elsewhere first, as ``i2v similar`` does in its index), when a pattern matches nothing, or when nothing
    at all is found.
    """
    paths: list[str] = []
    missing: list[str] = []
    specs = list(specs)
    for spec in specs:
        if spec == "-":
            if stdin is None:
                raise InputError("'-' reads paths from standard input, but none is available")
            paths.extend(read_path_list(stdin, nul))
            continue
        try:
            is_folder = stat.S_ISDIR(os.stat(spec).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(spec):
                paths.append(spec)  # a dangling symbolic link: its error record says so
            elif _GLOB_CHARS.search(spec):
                matches = [m for m in glob.glob(spec, recursive=True) if not os.path.isdir(m)]
                if not matches:
                    raise InputError(f"no file matches the pattern {spec!r}") from None
                paths.extend(sorted(matches, key=natural_key))
            else:
                (paths if keep_missing else missing).append(spec)
            continue
        except OSError:
            paths.append(spec)  # cannot be looked at (permission, loop, name too long): an error record
            continue
        if is_folder:
            found = walk_folder(spec, recursive)
            if not found and len(specs) == 1:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                raise InputError(f"no images in folder {spec}{hint}; supported extensions: {exts}")
            paths.extend(found)
        else:
            paths.append(spec)
    if missing:
        raise InputError(_missing_message(missing))
    if not paths:
        raise InputError("no input images: give files, folders, glob patterns, or '-' to read paths from stdin")
    return paths


def _missing_message(missing: list[str]) -> str:
    """One line naming the inputs that do not exist (the first three), with a close name for a single one."""
    if len(missing) == 1:
        spec = missing[0]
        close = difflib.get_close_matches(os.path.basename(spec.rstrip(os.sep)), _names_beside(spec), n=1, cutoff=0.8)
        hint = f" (did you mean {os.path.join(os.path.dirname(spec.rstrip(os.sep)), close[0])!r}?)" if close else ""
        return f"no such file or folder: {spec!r}{hint}"
    names = ", ".join(repr(m) for m in missing[:3])
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return f"no such files or folders: {names}{more}"


def _names_beside(spec: str) -> list[str]:
    parent = os.path.dirname(spec.rstrip(os.sep)) or "."
    try:
        with os.scandir(parent) as listing:
            return [e.name for e in listing]
    except OSError:
        return []
