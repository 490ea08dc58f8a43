"""Fetching the original release: resumable HTTP downloads, then conversion of the caffemodels to safetensors.

Only the standard library's urllib is used. A download goes to ``DEST.part`` and is renamed when complete, so
an interrupted one resumes with an HTTP Range request; a server that ignores Range (answers 200) restarts it.
Failures are :class:`~i2v_cli.errors.DownloadError`; progress goes to a callback, the library never prints.
"""

from __future__ import annotations

import gzip
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from .config import FEATURE, TAG
from .errors import DownloadError, TagListError, WeightsError
from .store import CAFFEMODEL_FILES, WEIGHT_FILES
from .tags import load_tag_list
from .weights import convert

#: The GitHub release of Illustration2Vec v2.0.0 ($I2V_BASE_URL overrides it).
RELEASE_BASE_URL = "https://github.com/rezoo/illustration2vec/releases/download/v2.0.0/"
#: The release's gzipped tag list.
TAG_LIST_FILE = "tag_list.json.gz"
#: The files of the release, as served.
RELEASE_FILES = (CAFFEMODEL_FILES[TAG], CAFFEMODEL_FILES[FEATURE], TAG_LIST_FILE)

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


def download(
    url: str,
    dest: str | os.PathLike[str],
    progress: ProgressCallback | Progress | None = None,
    *,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present, and rename it into place when complete.

    ``progress`` is a callback ``(done, total)`` or a tqdm-like bar (``update``/``total``); ``total`` is None
    when the server does not say. Returns ``dest``.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    report = _as_callback(progress)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create {dest.parent}: {exc.strerror or exc}") from None
    for _attempt in range(2):  # a second attempt only after a stale or unusable partial file was dropped
        have = part.stat().st_size if part.is_file() else 0
        outcome = _fetch(url, part, have, report, timeout)
        if outcome == "done":
            try:
                os.replace(part, dest)
            except OSError as exc:
                raise DownloadError(f"cannot write {dest}: {exc.strerror or exc}") from None
            return dest
        part.unlink(missing_ok=True)  # "restart": the partial file cannot be continued
    raise DownloadError(f"{url}: the server does not resume or restart the download cleanly")


def _fetch(url: str, part: Path, have: int, report: ProgressCallback | None, timeout: float) -> str:
    """One request: append to ``part`` (from ``have`` bytes) up to the end; "done", or "restart" without it."""
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            # Nothing left to send from ``have`` on: complete when the sizes agree, else start again.
            total = _range_total(exc.headers.get("Content-Range", ""))
            return "done" if total == have else "restart"
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {url}: {exc.reason}") from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise DownloadError(f"cannot reach {url}: {exc}") from None
    with response:
        status = getattr(response, "status", None) or 200  # file:// URLs (a local mirror) have no status
        if status == 206 and have:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                return "restart"
            total = None if match.group(3) == "*" else int(match.group(3))
            mode, done = "ab", have
        elif status == 200:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode, done = "wb", 0  # a fresh download, or a server that ignored Range: start from zero
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


def fetch_release(
    dest_dir: str | os.PathLike[str],
    base_url: str | None = None,
    which: Iterable[str] = (TAG, FEATURE),
    progress_factory: ProgressFactory | None = None,
    *,
    force: bool = False,
    keep_caffemodels: bool = False,
) -> list[Path]:
    """Download the release's tag list and caffemodels into ``dest_dir`` and convert the models to safetensors.

    ``base_url`` defaults to ``$I2V_BASE_URL``, else :data:`RELEASE_BASE_URL`. Files already converted are kept
    unless ``force``; the caffemodels are deleted once converted unless ``keep_caffemodels``. Returns the paths
    of ``tag_list.json`` and of each model's safetensors file.
    """
    which = tuple(dict.fromkeys(which))
    unknown = [k for k in which if k not in CAFFEMODEL_FILES]
    if unknown:
        raise ValueError(f"unknown model kind(s) {unknown}: expected {TAG!r} and/or {FEATURE!r}")
    base = base_url or os.environ.get("I2V_BASE_URL") or RELEASE_BASE_URL
    if not base.endswith("/"):
        base += "/"
    dest = Path(dest_dir).expanduser()
    written = [_fetch_tag_list(base, dest, progress_factory, force)]
    for kind in which:
        target = dest / WEIGHT_FILES[kind]
        if target.is_file() and not force:
            written.append(target)
            continue
        name = CAFFEMODEL_FILES[kind]
        url = urllib.parse.urljoin(base, name)
        caffemodel = dest / name
        if force or not caffemodel.is_file():  # a caffemodel left by an interrupted conversion is reused
            _download_with_bar(url, caffemodel, name, progress_factory)
        # Convert beside the target and rename only when the model is the kind its name promises.
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            try:
                info = convert(caffemodel, tmp)
            except WeightsError as exc:
                caffemodel.unlink(missing_ok=True)
                raise DownloadError(f"{url} did not give a usable caffemodel (removed; run again): {exc}") from None
            if info.kind != kind:
                raise DownloadError(f"{url} holds a {info.kind} model, not the {kind} model its name says")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if not keep_caffemodels:
            caffemodel.unlink(missing_ok=True)
        written.append(target)
    return written


def _fetch_tag_list(base: str, dest: Path, progress_factory: ProgressFactory | None, force: bool) -> Path:
    """Download ``tag_list.json.gz``, check it holds the 1,539 tags and write it un-gzipped as ``tag_list.json``."""
    target = dest / "tag_list.json"
    if target.is_file() and not force:
        return target
    url = urllib.parse.urljoin(base, TAG_LIST_FILE)
    gz = _download_with_bar(url, dest / TAG_LIST_FILE, TAG_LIST_FILE, progress_factory)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        try:
            with gzip.open(gz, "rb") as f:
                tmp.write_bytes(f.read())
        except (OSError, EOFError, zlib.error) as exc:
            raise DownloadError(f"{url} is not a gzip file ({exc})") from None
        try:
            load_tag_list(tmp)
        except TagListError as exc:
            raise DownloadError(f"{url}: {str(exc).replace(str(tmp), 'the tag list')}") from None
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    gz.unlink(missing_ok=True)
    return target


def _download_with_bar(url: str, dest: Path, name: str, factory: ProgressFactory | None) -> Path:
    """:func:`download` with a bar from ``factory``, made once the size is known and closed at the end."""
    if factory is None:
        return download(url, dest)
    bar: Any = None
    reports: list[ProgressCallback] = []

    def progress(done: int, total: int | None) -> None:
        nonlocal bar
        if bar is None:
            bar = factory(name, total)
            reports.append(_as_callback(bar) or (lambda done, total: None))
        reports[0](done, total)

    try:
        return download(url, dest, progress)
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
