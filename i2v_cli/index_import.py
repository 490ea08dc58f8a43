"""``i2v index --import``: load the output folders of ``i2v tag -t 0 --engine ray`` and ``i2v features --engine
ray`` (see :mod:`i2v_cli.ray_engine`) into an index, so a collection computed on a cluster is searched here.

The tag folder must hold every score: tag shards keep only the tags at or above the run's threshold, so the
run must be made with ``-t 0`` (JSONL or Parquet shards); anything else is refused, since an index stores all
1,539 scores. The feature folder must hold float features (not ``--binary``). Images are joined by path
(relative paths taken from the run's working folder, as recorded in its manifest); each file is hashed here,
so later runs of ``i2v index`` recognise it, and a file that is not reachable from here is a failure. Nothing
here prints.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import CATEGORIES, NUM_TAGS
from .decode import nul_name_message
from .errors import I2VError
from .features import FeatureFile, read_features
from .index import COMMIT_ROWS, Index, UpdateSummary, fs_path, not_a_file, probe
from .ray_engine import MANIFEST, cwd_of, read_tag_shard
from .writers import display, record_path


class ImportFolderError(I2VError):
    """A folder that cannot be imported: not a finished Ray output, the wrong kind, or not every tag score."""


def _regular(path: Path) -> Path:
    """``path``, when it is a regular file: anything else (a FIFO would block the read for ever) is an OSError."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(f"{display(str(path))} is not a regular file")
    return path


def _manifest(folder: str) -> dict[str, Any]:
    try:
        manifest = json.loads(_regular(Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportFolderError(f"--import {display(folder)}: not an `--engine ray` output folder ({exc})") from None
    if not isinstance(manifest, dict):
        raise ImportFolderError(f"--import {display(folder)}: not an `--engine ray` output folder (its {MANIFEST} "
                                "is not an object)")  # fmt: skip
    if manifest.get("status") != "complete":
        raise ImportFolderError(f"--import {display(folder)}: the Ray run did not finish (rerun it with --resume)")
    return manifest


#: What the import reads back: the formats of each kind's shards.
_FORMATS = {"tag": ("jsonl", "parquet"), "features": ("npy",)}


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _check_manifest(folder: str, manifest: dict[str, Any], kind: str) -> None:
    """Refuse a manifest whose fields are not what a Ray run writes (damaged, or made by hand), naming what is
    wrong, before anything is read or written: every shard a plain file name present in the folder, the shards in
    a format the import reads, ``options`` an object, ``cwd`` a folder name."""
    shown = f"--import {display(folder)}"
    fmt = manifest.get("output_format")
    if fmt not in _FORMATS[kind]:
        raise ImportFolderError(f"{shown}: {kind} shards in {fmt!r}; the import reads {' or '.join(_FORMATS[kind])}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and _plain_name(s.get("file")) for s in shards):
        raise ImportFolderError(f"{shown}: its {MANIFEST} lists its shards wrongly (damaged?)")
    names = [shard["file"] for shard in shards]
    if len(set(names)) != len(names):
        raise ImportFolderError(f"{shown}: its {MANIFEST} lists a shard twice (damaged?)")
    for name in names:
        if not (Path(folder) / name).is_file() or (kind == "features" and not name.endswith(".npy")):
            raise ImportFolderError(f"{shown}: shard {display(name)} is missing or not a regular file")
    if not isinstance(manifest.get("options", {}), dict):
        raise ImportFolderError(f"{shown}: its {MANIFEST}'s options are not an object (damaged?)")
    model = manifest.get("model")
    if not (
        isinstance(model, dict)
        and all(isinstance(model.get(k), str) and model.get(k) for k in ("source", "sha256"))
        and isinstance(model.get("tensors", "-"), str)
    ):
        raise ImportFolderError(f"{shown}: its {MANIFEST} does not name its model (source and sha256; damaged?)")
    try:
        cwd_of(manifest)
    except ValueError as exc:
        raise ImportFolderError(f"{shown}: its {MANIFEST}'s folder is damaged ({exc})") from None


@contextlib.contextmanager
def _reading(folder: str, what: str) -> Iterator[None]:
    """What reading ``what`` (a shard, a record) raises for damaged content, as the ImportFolderError naming it."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # JSON, Arrow, a record's shape
        raise ImportFolderError(f"--import {display(folder)}: {what} cannot be read ({exc})") from None


def _absolute(cwd: str, path: str) -> str:
    """A record's path made absolute against the run's folder and normalised, the same way for tags, features and
    failures (a run given ``./dir`` or ``dir//`` names ``/cwd/./dir/x``: matched only once normalised)."""
    return os.path.abspath(os.path.join(cwd, path))


def _tag_records(folder: str, manifest: dict[str, Any], cwd: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The tag folder's records, shard by shard, each with the absolute path it names; a damaged shard or record
    (not JSON, not an object, a path that is not text) is an ImportFolderError naming the shard and the record."""
    for shard in manifest["shards"]:
        with _reading(folder, f"shard {display(shard['file'])}"):
            records = read_tag_shard(_regular(Path(folder) / shard["file"]), manifest["output_format"])
        for n in itertools.count(1):
            with _reading(folder, f"shard {display(shard['file'])} (record {n})"):
                record = next(records, None)
                if record is None:
                    break
                if not isinstance(record, dict) or not isinstance(record.get("error", ""), str):
                    raise ValueError("not a {path, ...} object")
                path = _absolute(cwd, record_path(record))
            yield record, path


@dataclass(frozen=True)
class ImportSource:
    """A tag folder and a feature folder checked for import (:func:`import_source`), with their manifests."""

    tag_folder: str
    tag_manifest: dict[str, Any]
    feature_folder: str
    feature_manifest: dict[str, Any]


def import_source(folders: Sequence[str]) -> ImportSource:
    """Check that ``folders`` are one finished `i2v tag --engine ray` folder and one of `i2v features` (float), in
    either order, before anything is written; ImportFolderError says what is wrong."""
    by_kind: dict[str, tuple[str, dict[str, Any]]] = {}
    for folder in folders:
        manifest = _manifest(folder)
        command = manifest.get("command")
        by_kind[command if isinstance(command, str) else "?"] = (folder, manifest)
    if set(by_kind) != {"tag", "features"} or len(folders) != 2:
        raise ImportFolderError(
            "--import needs two folders: one of `i2v tag -t 0 --engine ray`, one of `i2v features --engine ray`"
        )
    tag_folder, tag_manifest = by_kind["tag"]
    feature_folder, feature_manifest = by_kind["features"]
    _check_manifest(tag_folder, tag_manifest, "tag")
    _check_manifest(feature_folder, feature_manifest, "features")
    if (tag_manifest.get("options") or {}).get("binary") or (feature_manifest.get("options") or {}).get("binary"):
        raise ImportFolderError(f"--import {display(feature_folder)}: binary features; the index needs float ones")
    return ImportSource(tag_folder, tag_manifest, feature_folder, feature_manifest)


def import_ray(
    index: Index, folders: Sequence[str] | ImportSource, on_record: Callable[[], Any] | None = None
) -> UpdateSummary:
    """Load a tag folder and a feature folder (in either order, or as :func:`import_source` checked them) into
    ``index``; counts as an update's."""
    source = folders if isinstance(folders, ImportSource) else import_source(folders)
    tag_folder, tag_manifest = source.tag_folder, source.tag_manifest
    feature_folder, feature_manifest = source.feature_folder, source.feature_manifest

    features: dict[str, tuple[FeatureFile, int]] = {}
    failures: dict[str, str] = {}
    feature_cwd = cwd_of(feature_manifest)
    for shard in feature_manifest.get("shards", []):
        with _reading(feature_folder, f"shard {display(shard['file'])}"):
            ff = read_features(_regular(Path(feature_folder) / shard["file"]))
            if ff.binary:
                raise ImportFolderError(
                    f"--import {display(feature_folder)}: binary features; the index needs float ones"
                )
            for row, path in enumerate(ff.paths):
                features[_absolute(feature_cwd, path)] = (ff, row)
        errors = Path(feature_folder) / (shard["file"][: -len(".npy")] + ".errors.jsonl")
        if os.path.lexists(errors):
            with _reading(feature_folder, f"shard {display(errors.name)}"):
                for line in _regular(errors).read_text(encoding="utf-8").splitlines():
                    record = json.loads(line)
                    if not isinstance(record.get("error"), str) or not record["error"]:
                        raise ValueError("a record without its error")
                    failures[_absolute(feature_cwd, record_path(record))] = record["error"]
    dim = next(iter(features.values()))[0].dim if features else 0
    index.check_models(tag_manifest.get("model", {}), feature_manifest.get("model", {}), dim)

    tags = index.tags
    # Column of each tag in its own category (a name may be in two: a character and a copyright can share one).
    columns = {c.name: {tags[i]: i for i in range(c.start, c.stop)} for c in CATEGORIES}
    seen: set[str] = set()
    summary = UpdateSummary()
    known = index.known()
    tag_cwd = cwd_of(tag_manifest)
    pending: list[tuple[Any, ...]] = []

    def flush() -> None:
        with index.transaction():
            for state, scores, feature, error in pending:
                index.put(state, scores, feature, error)
        pending.clear()

    for record, path in _tag_records(tag_folder, tag_manifest, tag_cwd):
        if on_record is not None:
            on_record()
        if path in seen:
            raise ImportFolderError(
                f"--import {display(tag_folder)}: two records of {display(path)}: not the output of one run"
            )
        seen.add(path)
        error = record.get("error") or failures.get(path)
        state = None
        try:
            st = os.stat(path)
            why = not_a_file(path, st)
            if why is None:
                state = probe(path, st)
        except OSError as exc:
            why = f"{display(path)}: not reachable from here ({exc.strerror or exc})"
        except ValueError:  # os's word for a NUL byte in the name
            why = nul_name_message(display(path))
        if state is None:
            summary.failed += 1
            summary.failures.append((path, why or ""))
            continue
        old = known.get(fs_path(path))
        if old is not None and old[3] == state.sha256 and not (old[4] and error is None):  # results kept
            if old[4]:
                summary.failed += 1
                summary.failures.append((path, error or ""))
            else:
                summary.unchanged += 1
            continue
        scores = feature = None
        if error is None:
            scores = np.zeros(NUM_TAGS, np.float32)
            n = 0
            with _reading(tag_folder, f"the record of {display(path)[:200]}"):
                for category in CATEGORIES:
                    column = columns[category.name]
                    for tag, score in (record.get(category.name) or {}).items():
                        if tag not in column:
                            raise ValueError(f"{tag!r} is not a {category.name} tag")
                        if isinstance(score, bool) or not isinstance(score, int | float) or not 0 <= score <= 1:
                            raise ValueError(f"score {score!r} of {tag!r} (a probability from 0 to 1)")
                        scores[column[tag]] = score
                        n += 1
            if n != NUM_TAGS:
                raise ImportFolderError(
                    f"--import {display(tag_folder)}: records hold {n} of the {NUM_TAGS} tag scores; the index "
                    "stores all of them: run `i2v tag -t 0 --engine ray` (JSONL or Parquet shards)"
                )
            found = features.get(path)
            if found is None:
                error = f"{display(path)}: no feature in {display(feature_folder)}"
            else:
                feature = np.asarray(found[0].vectors[found[1]], np.float32)
        if error is not None:
            summary.failed += 1
            summary.failures.append((path, error))
            scores = feature = None
        elif old is not None:
            summary.updated += 1
        else:
            summary.added += 1
        pending.append((state, scores, feature, error))
        if len(pending) >= COMMIT_ROWS:
            flush()
    if pending:
        flush()
    return summary
