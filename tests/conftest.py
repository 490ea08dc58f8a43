"""Shared fixtures: the golden synthetic models and images (tests/data/golden, copied from shared/golden)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).parent / "data" / "golden"
#: What a whole run of the suite leaves in its temporary folder (about 0.9 GB, measured), with room to spare.
SUITE_DISK_BYTES = 2 << 30


def _room() -> tuple[str, int]:
    import shutil
    import tempfile

    where = tempfile.gettempdir()
    return where, shutil.disk_usage(where).free


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say how much room the temporary folder has (shown without ``-q``)."""
    where, free = _room()
    return [f"free space in {where}: {free / 2**30:.1f} GiB"]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Warn, even under ``-q``, when the temporary folder lacks room for a run: a CI run on a nearly full disk
    failed with hundreds of setup errors and a crash of pytest's own output capture, none of which named it."""
    import sys

    where, free = _room()
    if free < SUITE_DISK_BYTES:
        print(
            f"warning: {where} has {free / 2**30:.1f} GiB free, less than the {SUITE_DISK_BYTES / 2**30:.0f} GiB "
            "a run of this suite needs: expect errors from a full disk",
            file=sys.stderr,
        )


@pytest.fixture(scope="session")
def golden() -> Path:
    """The golden folder: models/, images/, expected/ (see its README.md)."""
    return GOLDEN


@pytest.fixture(scope="session")
def golden_order() -> list[Path]:
    """The golden images in the row order of every expected array."""
    return [GOLDEN / line for line in (GOLDEN / "expected" / "order.txt").read_text().split()]


@pytest.fixture(scope="session")
def tag_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden tag model converted to safetensors once per session."""
    from i2v_cli.weights import convert

    out = tmp_path_factory.mktemp("weights") / "tag.safetensors"
    convert(GOLDEN / "models" / "tag_v2.caffemodel", out)
    return out


@pytest.fixture(scope="session")
def feature_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The golden feature model converted to safetensors once per session."""
    from i2v_cli.weights import convert

    out = tmp_path_factory.mktemp("weights") / "feature.safetensors"
    convert(GOLDEN / "models" / "feature_v1.caffemodel", out)
    return out


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep what i2v caches (downloads, ONNX exports) in a temporary folder, never in the user's own cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("I2V_HOME", str(tmp_path_factory.mktemp("i2v-home")))
        yield


def crashing(original: Callable[[Any], Any], pattern: str = "BOOM") -> Callable[[Any], Any]:
    """``original`` (a decoding function), except that it kills its own process (SIGKILL, as a crash in a native
    decoder or the out-of-memory killer would) for a path whose name contains ``pattern``. Monkeypatched in, fork
    carries it into the decoding workers and children."""

    def load(path: Any) -> Any:
        if pattern in os.path.basename(os.fspath(path)):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path)

    return load


@pytest.fixture
def full_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 1 MB tmpfs already full (every byte taken by a file named ``fill``): writes there fail with
    ENOSPC. Skipped where a tmpfs cannot be mounted (mounting needs root)."""
    import contextlib
    import subprocess

    small = tmp_path / "full"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with open(small / "fill", "wb", buffering=0) as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 4096)
        yield small
    finally:
        subprocess.run(["umount", "-l", str(small)])
