"""Where weights live: the per-user cache folder, the release's file names, and finding the file to use.

Reading and writing weight files is the job of :mod:`i2v_cli.weights`; this module only knows names and folders,
so it imports neither torch nor protobuf.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .atomic import write_bytes
from .config import FEATURE, TAG
from .errors import OutputError, WeightsNotFoundError

#: Converted weight files, as ``i2v weights download`` names them in the cache folder.
WEIGHT_FILES = {TAG: "illust2vec_tag_ver200.safetensors", FEATURE: "illust2vec_ver200.safetensors"}
#: The original release's caffemodels, by kind.
CAFFEMODEL_FILES = {TAG: "illust2vec_tag_ver200.caffemodel", FEATURE: "illust2vec_ver200.caffemodel"}
#: Sub-folder of the cache that holds ONNX exports (one per weights, torch version and opset).
ONNX_FOLDER = "onnx"
#: Sub-folder of the cache that holds the digests of weight files' tensors (:func:`remembered_digest`).
DIGESTS_FOLDER = "digests"


def default_weights_dir() -> Path:
    """The per-user folder ``i2v weights download`` fills: ``$I2V_HOME``, else ``$XDG_CACHE_HOME/i2v``, else
    ``~/.cache/i2v``."""
    home = os.environ.get("I2V_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "i2v"
    return Path.home() / ".cache" / "i2v"


def onnx_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of ONNX exports: ``onnx/`` under ``cache_dir``, else under :func:`default_weights_dir`."""
    return (Path(cache_dir) if cache_dir is not None else default_weights_dir()) / ONNX_FOLDER


def resolve_weights(explicit: str | None, kind: str, option: str = "--weights") -> Path:
    """The weight file to use for ``kind``: ``explicit`` (given as ``option``, the name messages use), then
    ``$I2V_WEIGHTS`` (file or folder), then the cache."""
    if kind not in WEIGHT_FILES:
        raise ValueError(f"kind must be {TAG!r} or {FEATURE!r}, not {kind!r}")
    if explicit:
        return _pick(Path(explicit).expanduser(), kind, option)
    env = os.environ.get("I2V_WEIGHTS")
    if env:
        return _pick(Path(env).expanduser(), kind, "$I2V_WEIGHTS")
    cache = default_weights_dir()
    found = _in_folder(cache, kind)
    if found is not None:
        return found
    target = cache / WEIGHT_FILES[kind]
    raise WeightsNotFoundError(
        f"no {kind} model weights found (no {option}, no $I2V_WEIGHTS, no {target}): run `i2v weights download`, "
        f"or `i2v weights convert FILE.caffemodel -o {target}`"
    )


def _in_folder(folder: Path, kind: str) -> Path | None:
    """The kind's converted file in ``folder``, else the release's caffemodel there, else None."""
    for name in (WEIGHT_FILES[kind], CAFFEMODEL_FILES[kind]):
        if (folder / name).is_file():
            return folder / name
    return None


def _pick(path: Path, kind: str, origin: str) -> Path:
    """``path`` itself when it is a file, the kind's file inside it when it is a folder."""
    if path.is_dir():
        found = _in_folder(path, kind)
        if found is None:
            raise WeightsNotFoundError(
                f"{origin} folder {path} holds no {WEIGHT_FILES[kind]} (nor {CAFFEMODEL_FILES[kind]})"
            )
        return found
    if not path.exists():
        raise WeightsNotFoundError(f"{origin}: {path} does not exist")
    return path


#: Where `i2v weights download` fetches the original release's files.
RELEASE_BASE_URL = "https://github.com/rezoo/illustration2vec/releases/download/v2.0.0/"


# --------------------------------------------------------------------------------------------------------------
# What names a network in the records of a run (job files, indexes, feature files, Ray manifests)


def model_identity(info: Any) -> dict[str, str]:
    """How records name the weights of a :class:`~i2v_cli.weights.WeightsInfo` (or its ``as_dict``): ``source``
    and ``sha256`` (the file the weights came from, as shown to users) and, when known, ``tensors``: the digest of
    the tensors themselves, which changes when a file is edited in place with its provenance kept."""
    get = info.get if isinstance(info, Mapping) else lambda key: getattr(info, key, None)
    identity = {"source": get("source"), "sha256": get("sha256")}
    if get("tensors"):
        identity["tensors"] = get("tensors")
    return identity


def same_weights(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether two :func:`model_identity` records name the same network: by their tensors when both record them
    (a caffemodel and its conversion are the same network), else by ``sha256`` (records of earlier versions)."""
    if old.get("tensors") and new.get("tensors"):
        return old["tensors"] == new["tensors"]
    return old.get("sha256") == new.get("sha256")


def how_weights_differ(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """What tells two records' networks apart, for a message: the same source file edited, or another file."""
    if old.get("sha256") == new.get("sha256"):
        return "the same source file with other tensors: edited since?"
    return "another SHA-256"


def file_identity(path: str | os.PathLike[str]) -> list[int]:
    """What says a file is unchanged without reading it: device, inode, size, modification and change times
    (the change time cannot be set back by a user: any write moves it). Raises OSError when it cannot be stat'ed."""
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def remembered_digest(path: Path, before: list[int] | None, compute: Callable[[], str]) -> str:
    """``compute()``, the digest of the weight file ``path`` whose :func:`file_identity` was ``before`` it was read,
    kept in the cache for the next run to take while the file's identity holds (hashing the real feature network's
    tensors takes 0.7 s). Nothing is kept when the file changed while it was read, or the cache is not writable."""
    real = os.fsencode(os.path.realpath(path)).hex()
    try:
        folder = default_weights_dir() / DIGESTS_FOLDER
    except RuntimeError:  # no home folder to find the cache in: nothing is kept
        before = None
    if before is not None:
        record_path = folder / f"{hashlib.sha256(real.encode()).hexdigest()[:32]}.json"
        try:
            record = json.loads(record_path.read_bytes())
            if record["path"] == real and record["identity"] == before and isinstance(record["digest"], str):
                return record["digest"]
        except (OSError, ValueError, KeyError, TypeError):  # no record, or one that is not ours to trust
            pass
    digest = compute()
    with contextlib.suppress(OSError, OutputError):
        if before is not None and file_identity(path) == before:
            record_path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(record_path, json.dumps({"path": real, "identity": before, "digest": digest}).encode())
    return digest
