"""Writing files so that a reader never sees half of one: the one helper every file i2v writes goes through.

rsync and curl's rule: the data goes to a temporary file in the target's own folder, is flushed and fsynced,
and is renamed over the target only when whole. The target is what the user named, followed through
symlinks (the link stays, its target gets the data). A target that is not a regular file (``/dev/stdout``, a
FIFO, a terminal, a character device) is written directly and never renamed over: replacing ``/dev/null``
with a regular file is the kind of accident this module exists to prevent. A new file's mode is
``0o666`` less the umask; a replaced file keeps its mode. On every exit path that Python sees (an exception,
Ctrl-C, a SIGTERM turned into an exception) the temporary file is removed. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import OutputError, WriteError

PathLike = str | os.PathLike[str]

_TMP_PREFIX = ".i2v-"
_TMP_SUFFIX = ".tmp"
_umask_lock = threading.Lock()
_umask: int | None = None


def umask() -> int:
    """The process's umask (read once: reading it means setting it, which is not thread-safe)."""
    global _umask
    with _umask_lock:
        if _umask is None:
            _umask = os.umask(0o022)
            os.umask(_umask)
        return _umask


def resolve_target(path: PathLike) -> Path:
    """The file that writing to ``path`` should change: ``path`` itself, or what its symlinks lead to (a
    dangling link leads to the file it names, which is then created)."""
    p = Path(os.path.abspath(os.fspath(path)))
    for _ in range(40):
        try:
            link = os.readlink(p)
        except OSError:
            return p
        p = Path(os.path.abspath(os.path.join(p.parent, link)))
    raise OutputError(f"{path}: too many levels of symbolic links")


_FD_PATH = re.compile(r"^/(?:dev/fd|proc/self/fd)/(\d+)$")
_STD_PATHS = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}


def std_fd(path: str) -> int | None:
    """The descriptor a ``/dev/stdout``-like name stands for (``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``), or None."""
    if path in _STD_PATHS:
        return _STD_PATHS[path]
    m = _FD_PATH.match(path)
    return int(m.group(1)) if m else None


def is_special(path: PathLike) -> bool:
    """Whether ``path`` exists and is not a regular file or a folder: a device, FIFO, socket or terminal,
    which is written in place (opened, written, closed) rather than replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


#: Errors of a write that say the file system itself cannot take more (not this one file): full (blocks or inodes),
#: over quota, failing. A run that meets one stops there, as every other write would fail the same way.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})


def describe_oserror(path: PathLike, exc: OSError) -> str:
    """One line for a failed write: the file and the reason in words (``No space left on device``)."""
    shown = os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        reason += " (free some space, or write elsewhere)"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason += " (choose a place you can write to)"
    return f"cannot write {shown}: {reason}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this module's temporary files."""
    return name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)


class AtomicFile:
    """A file being written that appears at its target only on :meth:`commit`; :meth:`discard` drops it.

    ``stream`` is open for writing (binary, or text with ``encoding``). For a special target (see
    :func:`is_special`) ``stream`` is the target itself and commit only closes it.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        text: bool = False,
        encoding: str = "utf-8",
        errors: str = "strict",
        newline: str | None = "",
        exclusive: bool = False,
    ) -> None:
        self.path = Path(os.fspath(path))
        self.exclusive = exclusive
        self.tmp: Path | None = None
        try:
            fd = std_fd(os.fspath(path))
            # A descriptor name or a special file is written as it is, before any link is followed: the links of
            # /dev/stdout lead to "pipe:[N]", which is no path.
            self.target = self.path if fd is not None or is_special(path) else resolve_target(path)
            if fd is not None:
                raw = os.fdopen(os.dup(fd), "wb")
            elif os.path.isdir(self.target):
                raise IsADirectoryError(errno.EISDIR, "it is a folder", str(path))
            elif is_special(self.target):
                raw = open(self.target, "wb")  # noqa: SIM115 (closed in commit/discard)
            else:
                fd, self.tmp = self._create_tmp()
                raw = open(fd, "wb")  # noqa: SIM115
        except OSError as exc:  # a full disk (no inode left for the temporary file) is a write error, as in commit
            raise (WriteError if exc.errno in DISK_ERRNOS else OutputError)(describe_oserror(path, exc)) from None
        self.stream: IO[Any] = (
            io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline=newline, write_through=True)
            if text
            else raw
        )
        self._raw = raw
        self.done = False

    def _create_tmp(self) -> tuple[int, Path]:
        folder = self.target.parent
        while True:
            tmp = folder / f"{_TMP_PREFIX}{self.target.name[:80]}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
            try:
                return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
            except FileExistsError:
                continue

    def commit(self, unless_changed: Callable[[], bool] | None = None) -> bool:
        """Flush, fsync and rename the file into place (with ``exclusive``, only if nothing is there yet:
        returns False and drops the data when something is; with ``unless_changed``, only if it still returns True
        once the data is on disk, just before the rename: a read-merge-write that another writer overtook is
        dropped). Raises OutputError when the disk refuses."""
        if self.done:
            return True
        try:
            self.stream.flush()
            if self.stream is not self._raw:
                self._raw.flush()
            if self.tmp is not None:
                os.fsync(self._raw.fileno())
            if self.stream is not self._raw:
                self.stream.close()
            self._raw.close()
            if self.tmp is None:
                self.done = True
                return True
            if unless_changed is not None and not unless_changed():
                self.discard()
                return False
            try:
                mode = stat.S_IMODE(os.stat(self.target).st_mode)
            except OSError:
                mode = 0o666 & ~umask()
            os.chmod(self.tmp, mode)
            if self.exclusive:
                try:
                    os.link(self.tmp, self.target)
                except FileExistsError:
                    self.done = True
                    return False
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                        raise
                    if os.path.lexists(self.target):
                        self.done = True
                        return False
                    os.replace(self.tmp, self.target)
                    self.tmp = None
            else:
                os.replace(self.tmp, self.target)
                self.tmp = None
            _fsync_folder(self.target.parent)
            self.done = True
            return True
        except OSError as exc:
            self.discard()
            raise WriteError(describe_oserror(self.path, exc)) from None
        finally:
            if self.done or self.tmp is not None:
                self._remove_tmp()

    def discard(self) -> None:
        """Close and remove the temporary file; the target is left as it was."""
        for f in (self.stream, self._raw):
            with contextlib.suppress(OSError, ValueError):
                f.close()
        self._remove_tmp()
        self.done = True

    def _remove_tmp(self) -> None:
        if self.tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            self.tmp = None


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, *, text: bool = False, **kwargs: Any) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: the file appears whole at ``path`` when the block ends
    without an exception, and not at all otherwise."""
    f = AtomicFile(path, text=text, **kwargs)
    try:
        yield f.stream
    except BaseException:
        f.discard()
        raise
    f.commit()


def write_bytes(path: PathLike, data: bytes, unless_changed: Callable[[], bool] | None = None) -> bool:
    """Put ``data`` at ``path`` atomically; a write the disk refuses (full, I/O error) is a WriteError naming it,
    and leaves ``path`` as it was. With ``unless_changed``, only if it still returns True just before the rename
    (see :meth:`AtomicFile.commit`): False when it did not, and nothing was written."""
    f = AtomicFile(path)
    try:
        f.stream.write(data)
    except OSError as exc:
        f.discard()
        raise WriteError(describe_oserror(path, exc)) from None
    except BaseException:
        f.discard()
        raise
    return f.commit(unless_changed=unless_changed)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Put ``text`` at ``path`` atomically (UTF-8, newlines as given)."""
    write_bytes(path, text.encode(encoding))


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two names lead to the same existing file (device and inode: links and hard links included)."""
    try:
        return os.path.samestat(os.stat(a), os.stat(b))
    except OSError:
        return False


@contextlib.contextmanager
def folder_lock(folder: PathLike, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock (an exclusive ``flock`` on the folder itself: no file is left behind) for one writer
    of files in it at a time. Taken by another process: with ``wait``, ``on_wait()`` is called, then it waits;
    without, BlockingIOError. Where the file system has no locks (or the folder cannot be opened), nothing is held."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        yield  # the folder's own errors are met, and reported, where its files are written
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # no locks here (some network file systems)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
