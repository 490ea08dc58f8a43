"""Caption files for dataset preparation: one text file per image holding its tags, comma-separated, in the
form that LoRA and fine-tuning trainers read (kohya-ss sd-scripts, EveryDream, OneTrainer and the like).

Everything here works on tag records (:func:`i2v_cli.tags.tag_record`): :func:`caption_tags` and
:func:`caption_text` say what goes in a caption, :func:`caption_path` where it goes, :func:`find_collisions`
and :func:`check_collisions` find images that would share a caption file before anything is written, and
:func:`write_caption` writes one file atomically under the chosen policy for files already there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import CaptionError
from .inputs import IMAGE_EXTENSIONS
from .tags import tag_key


#: What to do with a caption file that is already there.
EXISTING_POLICIES = ("skip", "overwrite", "append")
#: Categories whose selected tags go into a caption, in their order with ``character_first``.
CHARACTER_FIRST_ORDER = ("character", "copyright", "general")
#: The same categories in the order that breaks ties between equal scores in the default, by-score order.
SCORE_ORDER = ("general", "character", "copyright")

Outcome = Literal["written", "overwritten", "appended", "unchanged", "skipped", "failed"]
StrPath = str | os.PathLike[str]


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are written.

    - ``extension``: of the caption file, with or without its dot (``.txt``); never an image extension.
    - ``separator``: between tags (``", "``). One of only spaces or tabs needs ``underscores``, as tags
      hold spaces; one holding a newline gives a tag a line.
    - ``underscores``: spell tags Danbooru's way, spaces as underscores (``long hair`` -> ``long_hair``).
      Without it tags keep the tag list's own spelling (spaces).
    - ``exclude``: tags never written, matched in either spelling and any letter case (:func:`tag_key`).
    - ``character_first``: character tags, then copyright, then general, each highest score first. By
      default the selected tags of the three categories are merged and ordered by score, highest first
      (equal scores: general, character, copyright).
    - ``rating``: add the best-scoring rating as a plain tag (``safe``, ``questionable`` or ``explicit``,
      the words of Danbooru's ratings, with no ``rating:`` prefix, as trainers' taggers write them), last.
    - ``existing``: a caption file already there is ``skip``-ped (the default: nothing is ever destroyed),
      replaced (``overwrite``), or given the tags it lacks at its end (``append``: its own text is kept
      as it is, tags compare as in ``exclude``).
    - ``captions_dir``: write captions under this folder instead of beside the images, mirroring the
      images' folders below ``root`` (see :func:`caption_path`); ``root`` defaults to each image's own
      folder, which puts every caption directly in ``captions_dir``.
    """

    extension: str = ".txt"
    separator: str = ", "
    underscores: bool = False
    exclude: frozenset[str] = field(default_factory=frozenset)
    character_first: bool = False
    rating: bool = False
    existing: str = "skip"
    captions_dir: Path | None = None
    root: Path | None = None

    def __post_init__(self) -> None:
        ext = self.extension if self.extension.startswith(".") else "." + self.extension
        if ext == "." or "/" in ext or os.sep in ext or (os.altsep and os.altsep in ext):
            raise CaptionError(f"caption extension {self.extension!r} is not a file extension such as .txt")
        if ext.lower() in IMAGE_EXTENSIONS:
            raise CaptionError(f"caption extension {ext} is an image extension; captions would replace images")
        if not self.separator:
            raise CaptionError("the caption separator is empty; tags would run together")
        if not self.separator.strip() and "\n" not in self.separator and not self.underscores:
            raise CaptionError(
                f"separator {self.separator!r} cannot be told from the spaces inside tags; add underscores"
            )
        if self.existing not in EXISTING_POLICIES:
            raise CaptionError(
                f"existing-file policy {self.existing!r}: expected one of {', '.join(EXISTING_POLICIES)}"
            )
        object.__setattr__(self, "extension", ext)
        object.__setattr__(self, "exclude", frozenset(self.exclude))
        if self.captions_dir is not None:
            object.__setattr__(self, "captions_dir", Path(self.captions_dir))
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))


def _by_score(tags: Mapping[str, float]) -> list[str]:
    return sorted(tags, key=lambda t: -tags[t])  # sorted() is stable: equal scores keep the record's order


def caption_tags(record: Mapping[str, Any], options: CaptionOptions) -> list[str]:
    """The tags of one record as they go into its caption: ordered, spelled, excluded and without
    duplicates, per ``options``. An error record has none."""
    if "error" in record:
        return []
    if options.character_first:
        ordered = [t for cat in CHARACTER_FIRST_ORDER for t in _by_score(record.get(cat) or {})]
    else:
        merged = [(t, s) for cat in SCORE_ORDER for t, s in (record.get(cat) or {}).items()]
        ordered = [t for t, _ in sorted(merged, key=lambda ts: -ts[1])]
    ratings = record.get("rating") or {}
    if options.rating and ratings:
        ordered.append(max(ratings, key=lambda t: ratings[t]))  # max() keeps the first of equal scores
    excluded = {tag_key(t) for t in options.exclude}
    seen: set[str] = set()
    out: list[str] = []
    for tag in ordered:
        spelled = tag.replace(" ", "_") if options.underscores else tag
        key = tag_key(spelled)
        if key not in excluded and key not in seen:
            seen.add(key)
            out.append(spelled)
    return out


def caption_text(record: Mapping[str, Any], options: CaptionOptions) -> str:
    """The caption of one record: its tags joined by the separator, without a trailing newline."""
    return options.separator.join(caption_tags(record, options))


def parse_caption(text: str, separator: str = ", ") -> list[str]:
    """The tags in a caption file's text, split on lines and on ``separator`` (its spacing and a byte
    order mark ignored); with a separator of only spaces, on any white space, and of a newline, on lines."""
    token = separator.strip()
    tags: list[str] = []
    one_a_line = not token and "\n" in separator
    for line in text.removeprefix("\ufeff").splitlines():
        pieces = [line] if one_a_line else line.split(token or None)  # split(None): on runs of white space
        tags.extend(p.strip() for p in pieces if p.strip())
    return tags


def _abs(path: StrPath) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _dest(image_path: StrPath, options: CaptionOptions) -> Path:
    image = Path(image_path)
    if image.name in ("", ".", ".."):
        raise CaptionError(f"{os.fspath(image_path)!r} is not the path of an image file")
    if options.captions_dir is None:
        return image.with_name(image.stem + options.extension)
    if options.root is None:
        rel = Path(image.name)
    else:
        try:
            rel = Path(_abs(image)).relative_to(_abs(options.root))
        except ValueError:
            raise CaptionError(
                f"{image} is outside {options.root}, the folder that the captions folder mirrors"
            ) from None
    return options.captions_dir / rel.with_name(rel.stem + options.extension)


def caption_path(image_path: StrPath, options: CaptionOptions) -> Path:
    """Where an image's caption goes: beside it with the caption extension (``a/b.png`` -> ``a/b.txt``), or
    under ``captions_dir`` at the image's path relative to ``root`` (``root/x/b.png`` -> ``captions_dir/x/b.txt``).

    Raises CaptionError for an image outside ``root`` (rather than flattening it, which could put two
    images' captions in one file) and for a caption path that is the image itself.
    """
    dest = _dest(image_path, options)
    if _abs(dest) == _abs(image_path):
        raise CaptionError(f"the caption of {os.fspath(image_path)} would be the image itself")
    return dest


def find_collisions(paths: Iterable[StrPath], options: CaptionOptions) -> dict[Path, list[str]]:
    """Caption files that would be written for more than one image, or that are one of the images: each
    with the images involved, in input order. The same image given twice is not a collision.

    Paths compare as written, made absolute (not case-folded): on a case-insensitive file system, images
    whose names differ only in case are not reported. Raises CaptionError for an image outside ``root``.
    """
    images: dict[str, str] = {}  # absolute path -> the path as first given, in input order
    for path in paths:
        images.setdefault(_abs(path), os.fspath(path))
    order = {image: i for i, image in enumerate(images.values())}
    claims: dict[str, tuple[Path, set[str]]] = {}
    for image in images.values():
        dest = _dest(image, options)
        claims.setdefault(_abs(dest), (dest, set()))[1].add(image)
    out: dict[Path, list[str]] = {}
    for key, (dest, involved) in claims.items():
        if key in images:  # the caption would replace an input image
            involved.add(images[key])
        if len(involved) > 1 or key in images:
            out[dest] = sorted(involved, key=order.__getitem__)
    return out


def check_collisions(paths: Iterable[StrPath], options: CaptionOptions, shown: int = 3) -> None:
    """Raise CaptionError, naming the first ``shown`` cases, when :func:`find_collisions` finds any: run it
    before writing, so that no image's caption is mixed with another's."""
    collisions = find_collisions(paths, options)
    if not collisions:
        return
    cases = [f"{dest} <- {', '.join(images)}" for dest, images in list(collisions.items())[:shown]]
    more = f" and {len(collisions) - shown} more" if len(collisions) > shown else ""
    raise CaptionError(
        f"{len(collisions)} caption file(s) would serve more than one image or replace an image: "
        f"{'; '.join(cases)}{more}. Rename the images, or choose another caption extension or folder"
    )


def _write_atomic(dest: Path, data: bytes, *, replace: bool, mode: int | None) -> bool:
    """Write ``data`` to a temporary file beside ``dest`` and move it into place; without ``replace`` a
    file that appeared at ``dest`` meanwhile is left alone (hard link where the file system has them).
    Returns whether the file was put in place."""
    while True:
        tmp = dest.parent / f".i2v-{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 less the umask
            break
        except FileExistsError:
            continue
    try:
        with open(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            with contextlib.suppress(OSError):
                os.chmod(tmp, mode)
        if replace:
            os.replace(tmp, dest)
            return True
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return False
        except OSError:  # no hard links here: check, then rename
            if os.path.lexists(dest):
                return False
            os.replace(tmp, dest)
            return True
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_caption(record: Mapping[str, Any], options: CaptionOptions) -> Outcome:
    """Write one record's caption file (UTF-8, a trailing newline; an empty file for no tags), atomically.

    Returns what happened: ``written`` (a new file), ``overwritten``, ``appended``, ``unchanged`` (the file
    already held exactly this, or every tag when appending), ``skipped`` (a file was there, policy
    ``skip``), or ``failed`` for an error record, which gets no file. Folders under ``captions_dir`` are
    created. Raises CaptionError when a file cannot be read or written.
    """
    if "error" in record:
        return "failed"
    dest = caption_path(record["path"], options)
    tags = caption_tags(record, options)
    text = options.separator.join(tags)
    try:
        exists = os.path.lexists(dest)
        if exists and options.existing == "skip":
            return "skipped"
        old: str | None = None
        mode: int | None = None
        if exists and os.path.exists(dest):  # not a dangling symbolic link
            mode = stat.S_IMODE(os.stat(dest).st_mode)
            try:
                old = dest.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                if options.existing == "append":
                    raise CaptionError(f"{dest}: the caption file there is not UTF-8 text; not appending") from None
        outcome: Outcome
        if old is not None and options.existing == "append":
            present = {tag_key(t) for t in parse_caption(old, options.separator)}
            new = [t for t in tags if tag_key(t) not in present]
            if not new:
                return "unchanged"
            body = old.rstrip()
            token = options.separator.strip()
            if token and body.endswith(token):
                body = body[: -len(token)].rstrip()
            content = (body + options.separator if body else "") + options.separator.join(new) + "\n"
            outcome = "appended"
        else:
            content = text + "\n" if text else ""
            if old == content:
                return "unchanged"
            outcome = "overwritten" if exists else "written"
        if options.captions_dir is not None:
            dest.parent.mkdir(parents=True, exist_ok=True)
        if not _write_atomic(dest, content.encode("utf-8"), replace=exists, mode=mode):
            return "skipped"  # a file appeared there while this one was being written
        return outcome
    except OSError as exc:
        raise CaptionError(f"cannot write caption {dest}: {exc.strerror or exc}") from None


def common_root(paths: Sequence[StrPath]) -> Path:
    """The deepest folder holding every image (absolute): the default ``root`` that ``captions_dir``
    mirrors, so that captions keep the sub-folders the images are in and nothing above them."""
    if not paths:
        raise ValueError("common_root needs at least one path")
    return Path(os.path.commonpath([os.path.dirname(_abs(p)) for p in paths]))
