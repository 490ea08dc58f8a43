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

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import CATEGORIES, NUM_TAGS
from .errors import I2VError
from .features import FeatureFile, read_features
from .index import COMMIT_ROWS, Index, UpdateSummary, fs_path, not_a_file, probe
from .ray_engine import MANIFEST, cwd_of, read_tag_records
from .writers import display, record_path


class ImportFolderError(I2VError):
    """A folder that cannot be imported: not a finished Ray output, the wrong kind, or not every tag score."""


def _manifest(folder: str) -> dict[str, Any]:
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ImportFolderError(f"--import {display(folder)}: not an `--engine ray` output folder ({exc})") from None
    if manifest.get("status") != "complete":
        raise ImportFolderError(f"--import {display(folder)}: the Ray run did not finish (rerun it with --resume)")
    return manifest


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
        by_kind[manifest.get("command", "?")] = (folder, manifest)
    if set(by_kind) != {"tag", "features"} or len(folders) != 2:
        raise ImportFolderError(
            "--import needs two folders: one of `i2v tag -t 0 --engine ray`, one of `i2v features --engine ray`"
        )
    tag_folder, tag_manifest = by_kind["tag"]
    feature_folder, feature_manifest = by_kind["features"]
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
        ff = read_features(Path(feature_folder) / shard["file"])
        if ff.binary:
            raise ImportFolderError(f"--import {display(feature_folder)}: binary features; the index needs float ones")
        for row, path in enumerate(ff.paths):
            features[os.path.join(feature_cwd, path)] = (ff, row)
        errors = Path(feature_folder) / (shard["file"][: -len(".npy")] + ".errors.jsonl")
        if errors.exists():
            for line in errors.read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                failures[os.path.join(feature_cwd, record_path(record))] = record["error"]
    dim = next(iter(features.values()))[0].dim if features else 0
    index.check_models(tag_manifest.get("model", {}), feature_manifest.get("model", {}), dim)

    tags = index.tags
    column = {t: i for i, t in enumerate(tags)}
    summary = UpdateSummary()
    known = index.known()
    tag_cwd = cwd_of(tag_manifest)
    pending: list[tuple[Any, ...]] = []

    def flush() -> None:
        with index.transaction():
            for state, scores, feature, error in pending:
                index.put(state, scores, feature, error)
        pending.clear()

    for record in read_tag_records(tag_folder):
        if on_record is not None:
            on_record()
        path = os.path.abspath(os.path.join(tag_cwd, record_path(record)))
        error = record.get("error") or failures.get(path)
        state = None
        try:
            st = os.stat(path)
            why = not_a_file(path, st)
            if why is None:
                state = probe(path, st)
        except OSError as exc:
            why = f"{display(path)}: not reachable from here ({exc.strerror or exc})"
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
            for category in CATEGORIES:
                for tag, score in (record.get(category.name) or {}).items():
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
