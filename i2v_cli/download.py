"""Fetching the original release: checked, resumable HTTP downloads, then conversion of the caffemodels.

Only the standard library's urllib is used. A download's bytes go to ``DEST.part``, the resumable state (as
curl's ``-C``), with the server's validator (ETag or Last-Modified) recorded beside it in ``DEST.part.json``; an
interrupted download resumes with ``Range`` + ``If-Range``, so a server whose file changed sends the new file
whole instead of bytes to splice onto the old ones. A finished file is checked against the release's pinned
SHA-256 (:data:`RELEASE_SHA256`), whatever server sent it (``--base-url`` mirrors too), and only then reaches its
name, through :mod:`i2v_cli.atomic`. Failures are :class:`~i2v_cli.errors.DownloadError`; progress goes to a
callback, the library never prints.

:func:`fetch_release` uses what is already in the folder before the network: a converted model is checked and
kept; a caffemodel the user put there is converted and left in place (only what the command itself fetched is
ever deleted).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from .atomic import AtomicFile, folder_lock, is_special, resolve_target, write_text
from .config import FEATURE, TAG
from .errors import DownloadError, I2VError, I2VWarning, ServerUnreachableError, WeightsError
from .hashing import sha256_file
from .store import CAFFEMODEL_FILES, RELEASE_BASE_URL, WEIGHT_FILES
from .weights import load_weights, save_safetensors

#: The GitHub release of Illustration2Vec v2.0.0 ($I2V_BASE_URL overrides it).
#: The files of the release that i2v fetches. (The release's ``tag_list.json.gz`` is not fetched: i2v ships the
#: same 1,539 tags in its package, and the models' columns are defined by that packaged list.)
RELEASE_FILES = (CAFFEMODEL_FILES[TAG], CAFFEMODEL_FILES[FEATURE])
#: SHA-256 of each release file; a download that does not match is refused, from any server. None: not pinned.
#: Source: `sha256sum` of both files as posted in the upstream project's issue "Checksums to verify downloaded
#: models" (github.com/rezoo/illustration2vec/issues/10, comment of 2018-11-20); the only published values
#: found, not yet checked against a fresh download of the v2.0.0 release from here (no network).
RELEASE_SHA256: dict[str, str | None] = {
    CAFFEMODEL_FILES[TAG]: "a942bd80db6f46db7277c493f84b8a2f0a421f64bec12107dda112f73f26fdb1",
    CAFFEMODEL_FILES[FEATURE]: "63ca0a56323ba30ce1edaf752836211e808ba2ce2647fd1c7f17a1473a621509",
}

_CHUNK = 1 << 20
_USER_AGENT = "i2v (Illustration2Vec in PyTorch; +https://github.com/rezoo/illustration2vec)"
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Progress(Protocol):
    """What a progress bar needs to offer (tqdm does): ``update(n)`` and a settable ``total``."""

    total: Any

    def update(self, n: int) -> Any: ...


#: ``progress(done_bytes, total_bytes_or_None)``, called as a download advances.
ProgressCallback = Callable[[int, "int | None"], None]
#: ``factory(file_name, total_bytes_or_None)`` -> a progress bar (e.g. a tqdm), for :func:`fetch_release`.
ProgressFactory = Callable[[str, "int | None"], Progress]


# --------------------------------------------------------------------------------------------------------------
# One download into a folder at a time


def one_at_a_time(folder: Path) -> contextlib.AbstractContextManager[None]:
    """Hold the folder's download lock (:func:`~i2v_cli.atomic.folder_lock`). Two downloads into one folder shared
    its ``.part`` files: each truncated and removed the other's, and both failed, blaming the server. A second one
    now waits (saying so, as a warning) and then finds the file done."""

    def waiting() -> None:
        warnings.warn(f"another i2v is downloading into {folder}: waiting for it to finish", I2VWarning, stacklevel=5)

    return folder_lock(folder, on_wait=waiting)


# --------------------------------------------------------------------------------------------------------------
# One file


def download(
    url: str,
    dest: str | os.PathLike[str],
    progress: ProgressCallback | Progress | None = None,
    *,
    timeout: float = 60.0,
    sha256: str | None = None,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present, and put it in place when complete.

    ``progress`` is a callback ``(done, total)`` or a tqdm-like bar (``update``/``total``); ``total`` is None
    when the server does not say. With ``sha256``, a file whose hash differs is refused (and removed).
    ``dest`` is written through :mod:`i2v_cli.atomic` (a symlink's target gets the file). Returns ``dest``.
    """
    dest = Path(dest)
    part_path = _part_path(dest)
    _make_folder(part_path.parent)
    with one_at_a_time(part_path.parent):
        part = fetch(url, part_path, progress, timeout=timeout, sha256=sha256)
        try:
            _install(part, dest)
        finally:
            _drop(part)
    return dest


def fetch(
    url: str,
    part: Path,
    progress: ProgressCallback | Progress | None = None,
    *,
    timeout: float = 60.0,
    sha256: str | None = None,
) -> Path:
    """Bring ``part`` (a ``.part`` file, resumed if present) to the whole of ``url``, checked against ``sha256``
    when given; returns ``part``, complete. The caller installs it and removes it with its validator file."""
    report = _as_callback(progress)
    _make_folder(part.parent)
    # Attempts after the first follow a partial file dropped as stale or unusable, or a resumed file whose hash
    # was wrong (it is then fetched again whole, once).
    for _attempt in range(3):
        have = part.stat().st_size if part.is_file() else 0
        meta = _read_meta(part) if have else None
        if have and sha256 is not None and meta and meta.get("size") == have and _sha256_file(part) == sha256:
            return part  # finished and checked by an earlier run that stopped before using it: no request needed
        if have and not _resumable(meta, url, sha256):
            _drop(part)
            have, meta = 0, None
        outcome = _fetch(url, part, have, meta, report, timeout)
        if outcome == "restart":
            _drop(part)
            continue
        if sha256 is None:
            return part
        got = _sha256_file(part)
        if got == sha256:
            return part
        _drop(part)  # fetched by us, and wrong: never left to be resumed or installed
        if have:
            continue  # the bytes before the resume point may be another file's: fetch it whole once more
        raise DownloadError(
            f"{url} is not the expected file: its SHA-256 is {got}, the release's is {sha256} (a damaged download, "
            "or a server sending another file); removed it"
        )
    raise DownloadError(f"{url}: the server does not resume or restart the download cleanly")


def _part_path(dest: Path) -> Path:
    """The ``.part`` beside the file ``dest`` leads to (through symlinks), so that it is on the same disk."""
    target = resolve_target(dest)
    if is_special(target):
        raise DownloadError(f"{dest} is not a regular file (a device or a pipe): download to a file")
    return target.with_name(target.name + ".part")


def _meta_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _read_meta(part: Path) -> dict[str, Any] | None:
    """The validator recorded when ``part`` was started (url, etag, last_modified, size), or None."""
    try:
        meta = json.loads(_meta_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _resumable(meta: dict[str, Any] | None, url: str, sha256: str | None) -> bool:
    """Whether a partial file may be continued: its validator was recorded for this URL, or the pinned hash will
    catch bytes of another file at the end. Otherwise it is started again (never spliced blindly)."""
    if sha256 is not None:
        return True
    return meta is not None and meta.get("url") == url and bool(_if_range(meta))


def _if_range(meta: dict[str, Any] | None) -> str | None:
    """The ``If-Range`` value: a strong ETag (weak ones are not allowed there), else the Last-Modified date."""
    if not meta:
        return None
    etag = meta.get("etag")
    if isinstance(etag, str) and etag and not etag.startswith("W/"):
        return etag
    modified = meta.get("last_modified")
    return modified if isinstance(modified, str) and modified else None


def _fetch(
    url: str, part: Path, have: int, meta: dict[str, Any] | None, report: ProgressCallback | None, timeout: float
) -> str:
    """One request: append to ``part`` (from ``have`` bytes) up to the end; "done", or "restart" without it."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = _if_range(meta)
        if validator:
            headers["If-Range"] = validator
    try:
        request = urllib.request.Request(url, headers=headers)  # ValueError for a URL of no known scheme
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send from ``have`` on: complete when the sizes agree, else start again.
            total = _range_total(exc.headers.get("Content-Range", ""))
            return "done" if total == have else "restart"
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise ServerUnreachableError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise ServerUnreachableError(f"cannot reach {url}: {exc}") from None
    with response:
        status = getattr(response, "status", None) or 200  # file:// URLs (a local mirror) have no status
        if status == 206 and have:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                return "restart"
            total = None if match.group(3) == "*" else int(match.group(3))
            if not _same_file(meta, response.headers, total):
                return "restart"  # a server that ignored If-Range for a file that changed
            mode, done = "ab", have
        elif status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode, done = "wb", 0  # a fresh download, or the file changed / Range ignored: start from zero
            _write_meta(part, url, response.headers, total)
        else:
            raise DownloadError(f"{url}: unexpected HTTP {status} {response.reason}")
        try:
            out = part.open(mode)
        except OSError as exc:
            raise DownloadError(f"cannot write {part}: {exc.strerror or exc}") from None
        with out:
            if report:
                report(done, total)
            # read1: whatever has arrived (up to a chunk), so bytes received before a stall reach the file.
            read = getattr(response, "read1", response.read)
            try:
                while chunk := read(_CHUNK):
                    out.write(chunk)
                    done += len(chunk)
                    if report:
                        report(done, total)
            except (OSError, http.client.HTTPException) as exc:
                raise DownloadError(
                    f"download of {url} stopped at {_size(done)}{f' of {_size(total)}' if total else ''} "
                    f"({_reason(exc)}); run it again to resume"
                ) from None
    if total is not None and done != total:
        if done > total:
            return "restart"
        raise DownloadError(
            f"download of {url} stopped at {_size(done)} of {_size(total)} (connection closed early); "
            "run it again to resume"
        )
    return "done"


def _write_meta(part: Path, url: str, headers: Any, total: int | None) -> None:
    """Record what identifies the file being downloaded, for ``If-Range`` when it resumes."""
    meta = {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified"), "size": total}
    try:
        write_text(_meta_path(part), json.dumps(meta))
    except I2VError as exc:  # OutputError: the folder refuses files; the .part would fail next, with its name
        raise DownloadError(str(exc)) from None


def _same_file(meta: dict[str, Any] | None, headers: Any, total: int | None) -> bool:
    """Whether a 206 answer continues the file the partial one was started from (same ETag, same size)."""
    if not meta:
        return True  # nothing recorded: only the pinned hash can tell (see _resumable)
    etag = headers.get("ETag")
    if etag and meta.get("etag") and etag != meta["etag"]:
        return False
    size = meta.get("size")
    return not (isinstance(size, int) and total is not None and size != total)


def _install(part: Path, dest: Path) -> None:
    """Copy a finished download to ``dest`` through atomic.py (whole or not at all; symlinks kept)."""
    try:
        with part.open("rb") as src:
            out = AtomicFile(dest)
            try:
                while chunk := src.read(_CHUNK):
                    out.stream.write(chunk)
            except BaseException:
                out.discard()
                raise
            out.commit()
    except OSError as exc:
        raise DownloadError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except I2VError as exc:
        raise DownloadError(str(exc)) from None


def _drop(part: Path) -> None:
    """Remove a partial download and its validator."""
    for path in (part, _meta_path(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sha256_file(path: Path) -> str:
    try:
        return sha256_file(path).hex()
    except OSError as exc:
        raise DownloadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _range_total(content_range: str) -> int | None:
    """The full size in a ``Content-Range: bytes */SIZE`` (or ``bytes A-B/SIZE``) header."""
    match = re.match(r"^bytes (?:\*|\d+-\d+)/(\d+)$", content_range.strip())
    return int(match.group(1)) if match else None


def _as_callback(progress: ProgressCallback | Progress | None) -> ProgressCallback | None:
    """A ``(done, total)`` callback from a callback or a tqdm-like bar."""
    if progress is None or not hasattr(progress, "update"):
        return progress  # type: ignore[return-value]
    bar = progress
    shown = 0

    def report(done: int, total: int | None) -> None:
        nonlocal shown
        if total is not None and bar.total != total:
            bar.total = total
        if done < shown and hasattr(bar, "reset"):  # the download restarted from zero
            bar.reset(total=total)
            shown = 0
        bar.update(done - shown)
        shown = done

    return report


# --------------------------------------------------------------------------------------------------------------
# The release


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {folder}: {exc.strerror or exc}") from None


def fetch_release(
    dest_dir: str | os.PathLike[str],
    base_url: str | None = None,
    which: Iterable[str] = (TAG, FEATURE),
    progress_factory: ProgressFactory | None = None,
    *,
    force: bool = False,
    keep_caffemodels: bool = False,
) -> list[Path]:
    """Put each model of the release into ``dest_dir`` as safetensors; returns their paths.

    What is already there comes first and needs no network: a converted model is checked (kind, shapes) and
    kept; the release's caffemodel put there by the user is converted and left as it is. Otherwise the
    caffemodel is downloaded from ``base_url`` (default ``$I2V_BASE_URL``, else :data:`RELEASE_BASE_URL`),
    checked against :data:`RELEASE_SHA256`, converted, and deleted unless ``keep_caffemodels``. ``force``
    downloads and converts again whatever is there.
    """
    which = tuple(dict.fromkeys(which))
    unknown = [k for k in which if k not in CAFFEMODEL_FILES]
    if unknown:
        raise ValueError(f"unknown model kind(s) {unknown}: expected {TAG!r} and/or {FEATURE!r}")
    base = base_url or os.environ.get("I2V_BASE_URL") or RELEASE_BASE_URL
    if not base.endswith("/"):
        base += "/"
    dest = Path(dest_dir).expanduser()
    written = []
    for kind in which:
        target = dest / WEIGHT_FILES[kind]
        name = CAFFEMODEL_FILES[kind]
        local = dest / name
        _make_folder(_part_path(local).parent)
        # One run at a time per folder, from the look at what is there to the conversion: a run that waited finds
        # the model converted by the other.
        with one_at_a_time(_part_path(local).parent):
            if target.exists() and not force:
                _check_converted(target, kind)
            elif local.is_file() and not force:
                _convert_local(local, target, kind)
            else:
                url = urllib.parse.urljoin(base, name)
                _download_and_convert(url, dest, kind, progress_factory, keep_caffemodels)
        written.append(target)
    return written


def _check_converted(target: Path, kind: str) -> None:
    """A converted model already in the folder is used only when it reads as the kind its name says."""
    try:
        load_weights(target, kind)
    except WeightsError as exc:
        raise DownloadError(f"{exc} (found in the download folder: delete it to download the model again)") from None


def _convert_local(local: Path, target: Path, kind: str) -> None:
    """Convert a caffemodel that was in the folder before this command (the user's: never deleted)."""
    left = "it was left as it is; delete or move it to download the release's"
    try:
        state_dict, info = load_weights(local, kind)
    except WeightsError as exc:
        raise DownloadError(f"{exc} (found in the download folder, not downloaded: {left})") from None
    expected = RELEASE_SHA256.get(local.name)
    if expected is not None and info.sha256 != expected:
        raise DownloadError(
            f"{local} is not the release's file (its SHA-256 is {info.sha256}, the release's is {expected}); {left}, "
            f"or convert it yourself: i2v weights convert {local} -o {target}"
        )
    _save(state_dict, info, target)


def _download_and_convert(
    url: str, dest: Path, kind: str, progress_factory: ProgressFactory | None, keep: bool
) -> None:
    """Download a release caffemodel (checked), convert it, and delete it unless ``keep``."""
    name = CAFFEMODEL_FILES[kind]
    target = dest / WEIGHT_FILES[kind]
    try:
        part = _fetch_with_bar(url, _part_path(dest / name), name, progress_factory, RELEASE_SHA256.get(name))
    except ServerUnreachableError as exc:
        raise ServerUnreachableError(
            f"{exc}. Without this server: use a mirror (--base-url URL, or $I2V_BASE_URL), or download {name} "
            f"by hand, put it in {dest} and run this again (or: i2v weights convert {name} -o {target})"
        ) from None
    # The caffemodel was fetched by this command: it is removed once converted or found unusable (an interrupted
    # conversion leaves the .part, complete, for the next run: with a pinned hash it needs no request then).
    try:
        state_dict, info = load_weights(part)
    except WeightsError as exc:
        _drop(part)
        reason = str(exc).replace(str(part), name)
        raise DownloadError(f"{url} did not give a usable caffemodel (removed; run again): {reason}") from None
    if info.kind != kind:
        _drop(part)
        raise DownloadError(f"{url} holds a {info.kind} model, not the {kind} model its name says")
    _save(state_dict, dataclasses.replace(info, source=name), target)
    if keep:
        _install(part, dest / name)
    _drop(part)


def _save(state_dict: Any, info: Any, target: Path) -> None:
    try:
        save_safetensors(state_dict, target, info.to_metadata())
    except I2VError as exc:
        raise DownloadError(str(exc)) from None


def _fetch_with_bar(url: str, part: Path, name: str, factory: ProgressFactory | None, sha256: str | None) -> Path:
    """:func:`fetch` with a bar from ``factory``, made once the size is known and closed at the end."""
    if factory is None:
        return fetch(url, part, sha256=sha256)
    bar: Any = None
    reports: list[ProgressCallback] = []

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = factory(name, total)
            reports.append(_as_callback(bar) or (lambda done, total: None))
        reports[0](done, total)

    try:
        return fetch(url, part, progress, sha256=sha256)
    finally:
        if bar is not None and hasattr(bar, "close"):
            bar.close()


def _size(n: int | None) -> str:
    """A byte count for messages: ``12.3 MB``."""
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _reason(exc: BaseException) -> str:
    """A network error's short reason."""
    if isinstance(exc, http.client.IncompleteRead):
        return "connection closed early"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
