"""Caption files for dataset preparation: one text file per image holding its tags, comma-separated, in the
form that LoRA and fine-tuning trainers read (kohya-ss sd-scripts, EveryDream, OneTrainer and the like).

Everything here works on tag records (:func:`i2v_cli.tags.tag_record`): :func:`caption_tags` and
:func:`caption_text` say what goes in a caption, :func:`caption_path` where it goes, :func:`find_collisions`
and :func:`check_collisions` find images that would share a caption file (or the output file) before anything
is written, and :func:`write_caption` writes one file atomically (through :mod:`i2v_cli.atomic`) under the
chosen policy for files already there.

What the CLI calls, in order, before any network runs: :func:`caption_request` (the options of the command
line checked and resolved, warnings returned), :func:`check_captions_dir`, and :func:`already_captioned`
(images to leave out under ``skip``); then for each record :func:`exclude_tags` and :func:`write_caption`.
"""

from __future__ import annotations

import functools
import os
import stat
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from .atomic import DISK_ERRNOS, AtomicFile, describe_oserror, same_file
from .errors import CaptionError, OutputError, WriteError
from .inputs import IMAGE_EXTENSIONS
from .sniff import FOREIGN_KINDS, HEAD_BYTES, describe, sniff
from .tags import closest_tags, tag_key

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
        ext = check_extension(self.extension)
        if not self.separator:
            raise CaptionError("the caption separator is empty; tags would run together")
        try:
            self.separator.encode("utf-8")
        except UnicodeEncodeError:
            raise CaptionError(
                f"the caption separator {_show(self.separator)!r} is not UTF-8 text; caption files are UTF-8"
            ) from None
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


@functools.lru_cache(maxsize=1)
def _image_extensions() -> frozenset[str]:
    """The extensions i2v reads as images and every extension Pillow opens or writes, lower case."""
    return IMAGE_EXTENSIONS | {e.lower() for e in Image.registered_extensions()}


def check_extension(extension: str) -> str:
    """A caption file extension with its leading dot, or CaptionError: it must be a plain extension (not empty,
    ``.``, ending in a dot, or holding a path separator, NUL or another control character), and its last suffix
    must not be an image's (``.txt.png`` would name captions like images, and ``--overwrite`` replace them)."""
    ext = extension if extension.startswith(".") else "." + extension
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if ext.endswith(".") or any(c in seps or unicodedata.category(c) == "Cc" for c in ext):
        raise CaptionError(f"caption extension {extension!r} is not a file extension such as .txt")
    last = "." + ext.rsplit(".", 1)[1].lower()
    if last in _image_extensions():
        what = "is an image extension" if last == ext.lower() else f"ends in {last}, an image extension"
        raise CaptionError(
            f"caption extension {ext} {what}; captions would be named like images and could replace them"
        )
    return ext


def _spell(tag: str, options: CaptionOptions) -> str:
    return tag.replace(" ", "_") if options.underscores else tag


def unreadable_tags(tags: Iterable[str], options: CaptionOptions) -> list[str]:
    """The tags that a caption written with ``options`` could not give back whole: spelled as written (with
    underscores or not), each that :func:`parse_caption` would split or trim (it holds the separator, or a line
    break, or white space where white space separates). Excluded tags are never written, so never unreadable."""
    excluded = {tag_key(t) for t in options.exclude}
    out = []
    for tag in tags:
        spelled = _spell(tag, options)
        if tag_key(spelled) not in excluded and parse_caption(spelled, options.separator) != [spelled]:
            out.append(spelled)
    return out


def check_caption_tags(tags: Iterable[str], options: CaptionOptions, shown: int = 3) -> None:
    """Refuse, with CaptionError naming the first ``shown``, a separator that occurs inside tags as they would
    be written (``--caption-sep _`` with ``--underscores``, ``;`` with ``steins;gate``): such captions could not
    be split back into their tags. Run it on the tag list before anything is written."""
    bad = unreadable_tags(tags, options)
    if bad:
        more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
        raise CaptionError(
            f"the caption separator {options.separator!r} cannot be told apart from {len(bad)} tag(s) as written: "
            f"{', '.join(map(repr, bad[:shown]))}{more}. Choose another separator, or --exclude those tags"
        )


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
        spelled = _spell(tag, options)
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
    images' captions in one file) and for a caption path that is the image itself (by name, or through a
    symlink or hard link).
    """
    dest = _dest(image_path, options)
    if _abs(dest) == _abs(image_path) or same_file(dest, image_path):
        raise CaptionError(f"the caption of {_show(image_path)} would be the image itself")
    return dest


_Key = tuple[Any, ...]


def _file_key(path: StrPath, folders: dict[str, str]) -> _Key:
    """What names one file however it is reached: its device and inode when it exists (through symlinks, and a
    hard link is the same file), else the path with its folder's symlinks resolved (``folders`` caches them) or,
    for a dangling symlink, the path it leads to (where a write through it would create the file)."""
    try:
        st = os.stat(path)
    except OSError:
        pass
    else:
        return ("file", st.st_dev, st.st_ino)
    full = _abs(path)
    if os.path.islink(full):
        return ("path", os.path.realpath(full))
    parent, name = os.path.split(full)
    if parent not in folders:
        folders[parent] = os.path.realpath(parent)
    return ("path", os.path.join(folders[parent], name))


def find_collisions(paths: Iterable[StrPath], options: CaptionOptions) -> dict[Path, list[str]]:
    """Caption files that would be written for more than one image, or that are one of the images: each
    with the images involved, in input order. The same image given twice (by one name or two) is not a collision.

    Files compare by device and inode when they exist, so a caption name that is a symlink or hard link to an
    image counts as that image; a caption file not yet there compares by its path with symlinks resolved.
    Names are not case-folded: on a case-insensitive file system, new captions whose names differ only in
    case are not reported. Raises CaptionError for an image outside ``root``.
    """
    folders: dict[str, str] = {}
    names: dict[str, tuple[str, _Key]] = {}  # absolute name -> (the name as first given, its file), in input order
    for path in paths:
        full = _abs(path)
        if full not in names:
            names[full] = (os.fspath(path), _file_key(path, folders))
    inputs: dict[_Key, str] = {}  # each input file -> its first name
    for given, key in names.values():
        inputs.setdefault(key, given)
    order = {given: i for i, (given, _) in enumerate(names.values())}
    claims: dict[_Key, tuple[Path, dict[str, _Key]]] = {}  # caption file -> (its path, {image name: image file})
    for given, key in names.values():
        dest = _dest(given, options)
        claims.setdefault(_file_key(dest, folders), (dest, {}))[1][given] = key
    out: dict[Path, list[str]] = {}
    for dest_key, (dest, involved) in claims.items():
        replaced = inputs.get(dest_key)  # the caption would replace an input image
        if replaced is not None:
            involved.setdefault(replaced, dest_key)
        if len(set(involved.values())) > 1 or replaced is not None:
            out[dest] = sorted(involved, key=order.__getitem__)
    return out


def check_collisions(
    paths: Iterable[StrPath], options: CaptionOptions, shown: int = 3, *, outputs: Iterable[StrPath | None] = ()
) -> None:
    """Raise CaptionError, naming the first ``shown`` cases, when :func:`find_collisions` finds any, or when an
    image's caption file would be one of ``outputs`` (the ``-o`` file: the same path, through symlinks, or the
    same file by a hard link; None and ``-`` mean stdout). Run it before writing, so that no image's caption is
    mixed with another's and no caption replaces the records."""
    paths = list(paths)
    collisions = find_collisions(paths, options)
    if collisions:
        cases = [f"{dest} <- {', '.join(images)}" for dest, images in list(collisions.items())[:shown]]
        more = f" and {len(collisions) - shown} more" if len(collisions) > shown else ""
        raise CaptionError(
            f"{len(collisions)} caption file(s) would serve more than one image or replace an image: "
            f"{'; '.join(cases)}{more}. Rename the images, or choose another caption extension or folder"
        )
    for output in outputs:
        if output is None or os.fspath(output) in ("-", b"-"):
            continue
        real = os.path.realpath(output)
        try:
            out_stat: os.stat_result | None = os.stat(output)
        except OSError:
            out_stat = None
        for image in paths:
            dest = _dest(image, options)
            if os.path.realpath(dest) == real or (out_stat is not None and _same_stat(dest, out_stat)):
                raise CaptionError(
                    f"the caption of {_show(image)} would be {_show(dest)}, which is the output file "
                    f"{_show(output)}: choose another caption extension or folder, or another output file"
                )


def _same_stat(path: StrPath, other: os.stat_result) -> bool:
    try:
        return os.path.samestat(os.stat(path), other)
    except OSError:
        return False


def _show(path: StrPath) -> str:
    """A path for a message: valid UTF-8 whatever the name's bytes."""
    return os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")


#: Separators that a caption file written by another run or tool may use, checked when appending.
_OTHER_SEPARATORS = (",", ";", "|")


def _foreign_separator(text: str, options: CaptionOptions, new: Sequence[str]) -> str | None:
    """The separator a caption file seems to use instead of ``options.separator``, when appending with the
    latter would repeat its tags; else None.

    A file is taken to use the given separator when it holds it (for a line-break separator: more than one
    line; for a white space one: more than one word). Otherwise, if splitting it on another common separator
    (``,``, ``;``, ``|``, or white space when tags are written with underscores) finds a tag about to be
    appended, the file uses that one."""
    body = text.removeprefix("\ufeff")
    token = options.separator.strip()
    if token:
        if token in body:
            return None
    elif "\n" in options.separator:
        if sum(1 for line in body.splitlines() if line.strip()) > 1:
            return None
    elif len(body.split()) > 1:
        return None
    candidates = [c for c in _OTHER_SEPARATORS if c not in options.separator]
    if options.underscores and token:
        candidates.append(" ")
    wanted = {tag_key(t) for t in new}
    for candidate in candidates:
        if any(tag_key(t) in wanted for t in parse_caption(body, candidate)):
            return candidate
    return None


@dataclass(frozen=True)
class _Existing:
    """What is at a caption path: whether a file is there (through a symlink: a dangling one leads to none), its
    text (None when it is not UTF-8), its identity when read (:func:`i2v_cli.store.file_identity`'s fields), and,
    when appending, the descriptor that holds its lock until the merge is in place (the caller closes it)."""

    is_file: bool = False
    text: str | None = None
    identity: list[int] | None = None
    lock: int | None = None


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _current_identity(dest: StrPath) -> list[int] | None:
    try:
        return _identity(os.stat(dest))
    except OSError:
        return None


def _lock(fd: int, dest: Path) -> bool:
    """Take the exclusive lock of the open caption file ``fd`` (waiting for another i2v merging into it), and say
    whether ``dest`` still names that file: False when the other writer replaced it meanwhile (merge again). Where
    the file system has no locks, the identity check at the rename is what remains."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # no locks here (some network file systems)
        return True
    held = os.fstat(fd)
    try:
        now = os.stat(dest)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_existing(dest: Path, options: CaptionOptions) -> _Existing | None:
    """The file at ``dest``; None when appending and another writer replaced it while this one waited for its lock.
    CaptionError for a folder, a device or pipe (never read or replaced: captions go only to regular files), a file
    that cannot be read, one whose content is an image, a database, weights or an archive
    (:data:`i2v_cli.sniff.FOREIGN_KINDS`: a caption name that is a link to such a file must never replace it) or
    other binary data (a NUL byte in its first bytes: text in a legacy 8-bit encoding is still replaced), or,
    when appending, one that is not UTF-8 text."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return _Existing()  # a dangling symbolic link: written through, creating the file it names
    except OSError as exc:
        raise CaptionError(f"cannot read {_show(dest)}: {exc.strerror or exc}") from None
    try:
        read = _read_open(fd, dest, options)
    except BaseException:
        os.close(fd)
        raise
    if read is None or options.existing != "append":
        os.close(fd)  # the lock of an appended file is held until its merge is in place
        if read is None:
            return None
    text, identity = read
    return _Existing(True, text, identity, fd if options.existing == "append" else None)


def _read_open(fd: int, dest: Path, options: CaptionOptions) -> tuple[str | None, list[int]] | None:
    """:func:`_read_existing` on the open file: its text and identity, or None (replaced while waiting for its
    lock)."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            what = "it is a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, pipe or socket)"
            raise CaptionError(f"cannot write {_show(dest)}: {what}")
        head = os.read(fd, HEAD_BYTES)
        kind = sniff(head)
        if kind in FOREIGN_KINDS or (b"\0" in head and kind != "text"):  # binary data of a kind with no name too
            what = describe(kind) if kind in FOREIGN_KINDS else "binary data"
            raise CaptionError(
                f"{_show(dest)} holds something else ({what}), not a caption: it is left as it is "
                "(remove it, or choose another caption extension or folder)"
            )
        if options.existing == "append":
            if not _lock(fd, dest):
                return None
            os.lseek(fd, 0, os.SEEK_SET)  # read again under the lock: another writer may have changed it
            data = _read_all(fd)
        else:
            data = head + _read_all(fd)
        identity = _identity(os.fstat(fd))
    except OSError as exc:
        raise CaptionError(f"cannot read {_show(dest)}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8"), identity
    except UnicodeDecodeError:
        if options.existing == "append":
            raise CaptionError(f"{_show(dest)}: the caption file there is not UTF-8 text; not appending") from None
        return None, identity


def _appended(old: str, new: Sequence[str], options: CaptionOptions, dest: Path) -> str:
    """``old`` with ``new`` tags added at its end, in its own spelling and spacing."""
    other = _foreign_separator(old, options, new)
    if other is not None:
        raise CaptionError(
            f"{_show(dest)}: the caption file there seems to use {other!r} between tags, not "
            f"{options.separator!r}; appending would repeat its tags (give --caption-sep {other!r}, or --overwrite)"
        )
    body = old.rstrip()
    token = options.separator.strip()
    if token and body.endswith(token):
        body = body[: -len(token)].rstrip()
    return (body + options.separator if body else "") + options.separator.join(new) + "\n"


#: Merges of one caption file tried while another writer keeps changing it (``append``).
MERGE_TRIES = 5


def write_caption(record: Mapping[str, Any], options: CaptionOptions) -> Outcome:
    """Write one record's caption file (UTF-8, a trailing newline; an empty file for no tags), atomically.

    Returns what happened: ``written`` (a new file), ``overwritten``, ``appended``, ``unchanged`` (the file
    already held exactly this, or every tag when appending), ``skipped`` (a file was there, policy ``skip``,
    or one appeared there while this one was written), or ``failed`` for an error record, which gets no file.
    A caption path that is a symlink is written through (the link stays, its target gets the text). Folders
    under ``captions_dir`` are created. When appending, a file that another writer changed between the read and
    the rename is read and merged again (:data:`MERGE_TRIES` times), so that no writer's tags are lost.

    Raises CaptionError when a file cannot be read or written, is not a regular file, is the image itself or
    holds something other than text (an image, a database, ...: never replaced), when a tag holds the separator
    (:func:`unreadable_tags`), when appending to a file that seems to use another separator (appending would
    repeat its tags) or that other writers kept changing; WriteError when the disk refuses the write (full, an
    I/O error): the caller stops there, as every other caption would fail the same way.
    """
    if "error" in record:
        return "failed"
    dest = caption_path(record["path"], options)
    try:
        exists = os.path.lexists(dest)
        if exists and options.existing == "skip":
            return "skipped"
        tags = caption_tags(record, options)
        unreadable = unreadable_tags(tags, options)
        if unreadable:
            raise CaptionError(
                f"{_show(dest)}: the separator {options.separator!r} occurs in the tag(s) "
                f"{', '.join(map(repr, unreadable))}; the caption could not be split back into its tags"
            )
        for _ in range(MERGE_TRIES):
            outcome = _write_once(dest, tags, options)
            if outcome is not None:
                return outcome
        raise CaptionError(
            f"{_show(dest)}: another program kept changing the caption file while its tags were merged "
            f"({MERGE_TRIES} tries); left as it is"
        )
    except WriteError:
        raise
    except OutputError as exc:
        raise CaptionError(str(exc)) from None
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise WriteError(describe_oserror(dest, exc)) from None
        raise CaptionError(describe_oserror(dest, exc)) from None


def _write_once(dest: Path, tags: Sequence[str], options: CaptionOptions) -> Outcome | None:
    """One read-merge-write of a caption file; None when, appending, another writer changed (or created) the file
    meanwhile and nothing was written: the caller merges again."""
    old = _read_existing(dest, options) if os.path.lexists(dest) else _Existing()
    if old is None:
        return None
    try:
        return _merge_and_write(dest, tags, options, old)
    finally:
        if old.lock is not None:
            os.close(old.lock)  # releases the lock, once the merge is in place (or was dropped)


def _merge_and_write(dest: Path, tags: Sequence[str], options: CaptionOptions, old: _Existing) -> Outcome | None:
    """The caption of ``tags`` merged with (or replacing) ``old`` and put in place; None as in :func:`_write_once`."""
    outcome: Outcome
    if old.text is not None and options.existing == "append":
        present = {tag_key(t) for t in parse_caption(old.text, options.separator)}
        new = [t for t in tags if tag_key(t) not in present]
        if not new:
            return "unchanged"
        content = _appended(old.text, new, options, dest)
        outcome = "appended"
    else:
        text = options.separator.join(tags)
        content = text + "\n" if text else ""
        if old.text == content:
            return "unchanged"
        outcome = "overwritten" if old.is_file else "written"
    if options.captions_dir is not None:
        dest.parent.mkdir(parents=True, exist_ok=True)
    # Where no file was, only a new one is put in place: one that appeared meanwhile is left alone (merged with,
    # when appending). Appending to a file puts the merge in place only if the file is still the one read.
    appending = options.existing == "append"
    unless_changed = (lambda: _current_identity(dest) == old.identity) if appending and old.is_file else None
    f = AtomicFile(dest, exclusive=not old.is_file)
    try:
        f.stream.write(content.encode("utf-8"))
    except BaseException:
        f.discard()
        raise
    if f.commit(unless_changed=unless_changed):
        return outcome
    return None if appending else "skipped"


def check_captions_dir(options: CaptionOptions | None) -> None:
    """Before any network runs, make sure captions can be written under ``captions_dir``: create it (and its
    parents) and create and remove a temporary file in it. Raises CaptionError naming the folder and the reason
    (a file in the way, no permission, a read-only file system). Nothing to do without a captions folder."""
    if options is None or options.captions_dir is None:
        return
    folder = options.captions_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
        AtomicFile(folder / "write-check").discard()  # creates its temporary file in the folder, then removes it
    except FileExistsError:
        raise CaptionError(f"cannot use {_show(folder)} as the captions folder: it is a file, not a folder") from None
    except OSError as exc:
        raise CaptionError(f"cannot use {_show(folder)} as the captions folder: {exc.strerror or exc}") from None
    except OutputError as exc:
        raise CaptionError(f"cannot use {_show(folder)} as the captions folder ({exc})") from None


def already_captioned(paths: Iterable[StrPath], options: CaptionOptions) -> list[StrPath]:
    """Under the ``skip`` policy, the images whose caption file is already there (a dangling symlink counts, as
    :func:`write_caption` skips it too), in input order; none under ``overwrite`` or ``append``. The CLI leaves
    them out before the network runs and counts them as skipped."""
    if options.existing != "skip":
        return []
    return [p for p in paths if os.path.lexists(caption_path(p, options))]


def exclude_tags(record: Mapping[str, Any], exclude: Iterable[str]) -> dict[str, Any]:
    """A copy of a tag record without the ``exclude`` tags (either spelling, any case: :func:`tag_key`) in its
    general, character and copyright categories; rating keeps all three ratings (they are one distribution, and
    ``--rating-tag`` picks the best of them). An error record is returned as it is."""
    excluded = {tag_key(t) for t in exclude}
    out = dict(record)
    if not excluded or "error" in record:
        return out
    for cat in SCORE_ORDER:
        if isinstance(record.get(cat), Mapping):
            out[cat] = {t: s for t, s in record[cat].items() if tag_key(t) not in excluded}
    return out


def exclude_warnings(exclude: Iterable[str], tags: Sequence[str]) -> list[str]:
    """One warning per ``exclude`` name that matches no tag of ``tags`` in any spelling, with the closest
    names (the library never prints: the CLI shows them)."""
    known = {tag_key(t) for t in tags}
    warnings = []
    for name in sorted(exclude, key=tag_key):
        if tag_key(name) in known:
            continue
        close = closest_tags(name, tags)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else " (nothing close)"
        warnings.append(f"--exclude {name!r} is not in the tag list{hint}")
    return warnings


@dataclass(frozen=True)
class CaptionRequest:
    """What the command line asked for about captions: the options of the caption files (None: no captions),
    the tags to leave out of the records too (``--exclude``), and warnings for the user."""

    options: CaptionOptions | None
    exclude: frozenset[str]
    warnings: list[str]


#: The caption-only parameters of ``i2v tag`` (Click names) with their defaults and their options' names.
CAPTION_ONLY: dict[str, tuple[object, str]] = {
    "caption_ext": (".txt", "--caption-ext"),
    "caption_sep": (", ", "--caption-sep"),
    "underscores": (False, "--underscores"),
    "character_first": (False, "--character-first"),
    "rating_tag": (False, "--rating-tag"),
    "skip_existing": (False, "--skip-existing"),
    "overwrite": (False, "--overwrite"),
    "append": (False, "--append"),
    "existing": ("skip", "--overwrite/--append"),
}


def parse_exclude(specs: Iterable[str]) -> frozenset[str]:
    """The tags of ``--exclude`` options: each repeatable and comma-separated, white space trimmed."""
    return frozenset(t.strip() for spec in specs for t in spec.split(",") if t.strip())


def caption_request(
    params: Mapping[str, Any],
    inputs: Sequence[StrPath],
    folders: Sequence[StrPath] = (),
    *,
    tags: Sequence[str] | None = None,
    outputs: Iterable[StrPath | None] = (),
    given: Collection[str] | None = None,
) -> CaptionRequest:
    """Check and resolve ``i2v tag``'s caption options before anything runs.

    ``params`` holds Click's values: ``captions``, ``captions_dir``, ``caption_ext``, ``caption_sep``,
    ``underscores``, ``exclude`` (the raw ``--exclude`` values), ``character_first``, ``rating_tag``, and the
    policy either as three flags ``skip_existing``/``overwrite``/``append`` (each True when given: then
    contradictions are found) or as one ``existing`` value. ``given`` names the parameters set on the command
    line (``ctx.get_parameter_source``); without it, a value other than the default counts as given.
    ``inputs`` are the images, ``folders`` the folders named on the command line (the one that
    ``captions_dir`` mirrors when there is one, else the images' common folder), ``tags`` the tag list (the
    separator is checked against it and ``--exclude`` names are looked up in it), ``outputs`` the ``-o`` file(s).

    Raises CaptionError for contradicting options (``--overwrite`` with ``--append`` or ``--skip-existing``),
    caption-only options without ``--captions``/``--captions-dir`` (``--exclude`` alone filters the records),
    a bad extension or separator, colliding captions, or a caption that would be an output file.
    """

    def is_given(name: str) -> bool:
        if name not in params:
            return False
        return name in given if given is not None else params[name] != CAPTION_ONLY[name][0]

    flags = [name for name in ("skip_existing", "overwrite", "append") if params.get(name)]
    if len(flags) > 1:
        names = " and ".join(CAPTION_ONLY[name][1] for name in flags)
        raise CaptionError(f"{names} contradict each other: choose one policy for caption files already there")
    existing = flags[0].replace("_existing", "") if flags else params.get("existing") or "skip"
    exclude = parse_exclude(params.get("exclude") or ())
    warnings = exclude_warnings(exclude, tags) if tags is not None else []
    if not (params.get("captions") or params.get("captions_dir")):
        stray = [CAPTION_ONLY[name][1] for name in CAPTION_ONLY if is_given(name)]
        if stray:
            them = "it" if len(stray) == 1 else "them"
            raise CaptionError(
                f"{', '.join(stray)} only shape caption files: add --captions (or --captions-dir DIR), or leave "
                f"{them} out"
            )
        return CaptionRequest(None, exclude, warnings)
    root = None
    if params.get("captions_dir"):
        root = Path(folders[0]) if len(folders) == 1 else common_root(inputs)
    options = CaptionOptions(
        extension=params.get("caption_ext", ".txt"),
        separator=params.get("caption_sep", ", "),
        underscores=bool(params.get("underscores")),
        exclude=exclude,
        character_first=bool(params.get("character_first")),
        rating=bool(params.get("rating_tag")),
        existing=existing,
        captions_dir=params.get("captions_dir"),
        root=root,
    )
    if tags is not None:
        check_caption_tags(tags, options)
    check_collisions(inputs, options, outputs=outputs)
    return CaptionRequest(options, exclude, warnings)


def common_root(paths: Sequence[StrPath]) -> Path:
    """The deepest folder holding every image (absolute): the default ``root`` that ``captions_dir``
    mirrors, so that captions keep the sub-folders the images are in and nothing above them."""
    if not paths:
        raise ValueError("common_root needs at least one path")
    return Path(os.path.commonpath([os.path.dirname(_abs(p)) for p in paths]))
