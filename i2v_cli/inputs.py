"""Finding the images to process: files, folders, glob patterns and lists of paths read from a stream."""

from __future__ import annotations

import glob
import os
import re
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
    """The image files in ``folder`` (and its sub-folders when ``recursive``) in natural sort order."""
    found: list[str] = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs.sort(key=natural_key)
            found.extend(os.path.join(root, f) for f in files if is_image_name(f))
    else:
        with os.scandir(folder) as entries:
            # A sub-folder named like an image is kept, so that it gets an error record rather than vanishing.
            found.extend(e.path for e in entries if is_image_name(e.name))
    return sorted(found, key=natural_key)


def read_path_list(stream: IO[bytes], nul: bool = False) -> Iterator[str]:
    """Paths from a byte stream, one a line or NUL-separated (``find -print0``); bytes that are not UTF-8
    survive through the file system encoding's surrogate escapes."""
    data = stream.read()
    parts = data.split(b"\0") if nul else data.splitlines()
    for part in parts:
        if not nul:
            part = part.rstrip(b"\r")
        if part:
            yield os.fsdecode(part)


def expand_inputs(
    specs: Iterable[str], *, recursive: bool = False, stdin: IO[bytes] | None = None, nul: bool = False
) -> list[str]:
    """Turn command-line inputs into the ordered list of image paths to process.

    A folder gives its images in natural order; a glob pattern its matches; ``-`` the paths read from
    ``stdin``; any other name is kept as is, so that a missing or broken file becomes an error record
    for that file instead of stopping the run. Raises InputError when nothing at all is found.
    """
    paths: list[str] = []
    specs = list(specs)
    for spec in specs:
        if spec == "-":
            if stdin is None:
                raise InputError("'-' reads paths from standard input, but none is available")
            paths.extend(read_path_list(stdin, nul))
        elif os.path.isdir(spec):
            found = walk_folder(spec, recursive)
            if not found and len(specs) == 1:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                hint = "" if recursive else " (add --recursive to look in sub-folders)"
                raise InputError(f"no images in folder {spec}{hint}; supported extensions: {exts}")
            paths.extend(found)
        elif _GLOB_CHARS.search(spec) and not os.path.lexists(spec):
            matches = [m for m in glob.glob(spec, recursive=True) if not os.path.isdir(m)]
            if not matches:
                raise InputError(f"no file matches the pattern {spec!r}")
            paths.extend(sorted(matches, key=natural_key))
        else:
            paths.append(spec)
    if not paths:
        raise InputError("no input images: give files, folders, glob patterns, or '-' to read paths from stdin")
    return paths
