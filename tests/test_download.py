"""Downloads against a real loopback HTTP server: whole files, resuming, servers ignoring Range, failures,
and fetching a release (tag list + caffemodels converted to safetensors)."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from i2v_cli import download as dl
from i2v_cli.download import RELEASE_BASE_URL, download, fetch_release
from i2v_cli.errors import DownloadError
from i2v_cli.tags import load_tag_list
from i2v_cli.weights import load_weights

MODELS = Path(__file__).parent / "data" / "golden" / "models"
MODEL = (MODELS / "tag_v2.caffemodel").read_bytes()


@dataclass
class Served:
    """What the loopback server serves and how it misbehaves; it records each request."""

    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    cut_after: int | None = None  # send only this many body bytes of the next response, then hang up
    stall_after: int | None = None  # send this many body bytes of the next response, then wait for `release`
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    sent: list[int] = field(default_factory=list)  # body bytes sent per response


class Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        served = self.served
        rng = self.headers.get("Range")
        served.requests.append((self.path, rng))
        data = served.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng and not served.ignore_range:
            start = int(rng.removeprefix("bytes=").removesuffix("-"))
            if start >= len(data):
                self.send_response(416, "Range Not Satisfiable")
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if served.cut_after is not None:
            body, served.cut_after = body[: served.cut_after], None
        if served.stall_after is not None:
            stall, served.stall_after = served.stall_after, None
            self.wfile.write(body[:stall])
            self.wfile.flush()
            served.release.wait(10)
            return
        self.wfile.write(body)
        served.sent.append(len(body))


@pytest.fixture
def server() -> Iterator[tuple[str, Served]]:
    """A ThreadingHTTPServer on 127.0.0.1 (port chosen by the system) and its settings."""
    served = Served()
    handler = type("BoundHandler", (Handler,), {"served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/", served
    finally:
        served.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()


# ------------------------------------------------------------------------------------------------------------
# download()


def test_whole_file(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    calls: list[tuple[int, int | None]] = []
    dest = tmp_path / "sub" / "m.caffemodel"
    assert download(base + "m.caffemodel", dest, lambda done, total: calls.append((done, total))) == dest
    assert dest.read_bytes() == MODEL
    assert sorted(p.name for p in dest.parent.iterdir()) == ["m.caffemodel"]
    assert calls[0] == (0, len(MODEL))
    assert calls[-1] == (len(MODEL), len(MODEL))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert served.requests == [("/m.caffemodel", None)]


def test_cut_off_then_resumed(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    served.cut_after = 700_000
    dest = tmp_path / "m.caffemodel"
    with pytest.raises(DownloadError) as exc:
        download(base + "m.caffemodel", dest)
    assert str(exc.value) == (
        f"download of {base}m.caffemodel stopped at 0.7 MB of {len(MODEL) / 1e6:.1f} MB (connection closed early); "
        "run it again to resume"
    )
    assert not dest.exists()
    assert (tmp_path / "m.caffemodel.part").read_bytes() == MODEL[:700_000]

    download(base + "m.caffemodel", dest)
    assert dest.read_bytes() == MODEL
    assert not (tmp_path / "m.caffemodel.part").exists()
    assert served.requests[-1] == ("/m.caffemodel", "bytes=700000-")
    assert served.sent == [700_000, len(MODEL) - 700_000]


def test_stalled_server_times_out_then_resumes(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    served.stall_after = 300_000
    dest = tmp_path / "m.caffemodel"
    with pytest.raises(DownloadError) as exc:
        download(base + "m.caffemodel", dest, timeout=0.3)
    assert str(exc.value) == (
        f"download of {base}m.caffemodel stopped at 0.3 MB of {len(MODEL) / 1e6:.1f} MB (timed out); "
        "run it again to resume"
    )
    assert (tmp_path / "m.caffemodel.part").read_bytes() == MODEL[:300_000]
    download(base + "m.caffemodel", dest)
    assert dest.read_bytes() == MODEL
    assert served.requests[-1] == ("/m.caffemodel", "bytes=300000-")


def test_resume_reports_progress_from_the_partial_size(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL[:1000])
    bar = FakeBar()
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", bar)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert bar.total == len(MODEL)
    assert bar.n == len(MODEL)
    assert bar.updates[0] == 1000


def test_server_ignoring_range_restarts(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    served.ignore_range = True
    (tmp_path / "m.caffemodel.part").write_bytes(b"stale bytes that must not stay in front")
    bar = FakeBar()
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", bar)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.requests == [("/m.caffemodel", "bytes=39-")]
    assert (bar.resets, bar.n) == (0, len(MODEL))


def test_complete_partial_file_is_finished_by_416(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL)
    download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.sent == []


def test_partial_file_longer_than_the_file_restarts(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL + b"junk")
    download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.requests == [("/m.caffemodel", f"bytes={len(MODEL) + 4}-"), ("/m.caffemodel", None)]


def test_http_error(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, _ = server
    with pytest.raises(DownloadError) as exc:
        download(base + "missing.caffemodel", tmp_path / "x")
    assert str(exc.value) == f"{base}missing.caffemodel: HTTP 404 Not Found"
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as exc:
        download(f"http://127.0.0.1:{port}/x", tmp_path / "x", timeout=5)
    assert str(exc.value).startswith(f"cannot reach http://127.0.0.1:{port}/x: ")
    assert "\n" not in str(exc.value)


class FakeBar:
    """What download() uses of a tqdm bar."""

    def __init__(self, name: str = "", total: int | None = None) -> None:
        self.name, self.total, self.n, self.updates, self.resets, self.closed = name, total, 0, [], 0, False

    def update(self, n: int) -> None:
        self.n += n
        self.updates.append(n)

    def reset(self, total: int | None = None) -> None:
        self.n, self.total, self.resets = 0, total, self.resets + 1

    def close(self) -> None:
        self.closed = True


# ------------------------------------------------------------------------------------------------------------
# fetch_release()


def _release(served: Served, tags: list[str] | None = None) -> None:
    served.files["/illust2vec_tag_ver200.caffemodel"] = MODEL
    served.files["/illust2vec_ver200.caffemodel"] = (MODELS / "feature_v1.caffemodel").read_bytes()
    served.files["/tag_list.json.gz"] = gzip.compress(json.dumps(tags or load_tag_list()).encode())


def test_fetch_release(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    _release(served)
    bars: list[FakeBar] = []

    def factory(name: str, total: int | None) -> FakeBar:
        bars.append(FakeBar(name, total))
        return bars[-1]

    written = fetch_release(tmp_path / "w", base_url=base, progress_factory=factory)
    assert written == [
        tmp_path / "w" / "tag_list.json",
        tmp_path / "w" / "illust2vec_tag_ver200.safetensors",
        tmp_path / "w" / "illust2vec_ver200.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(p.name for p in written)
    assert json.loads(written[0].read_text()) == load_tag_list()
    tag_info = load_weights(written[1])[1]
    assert (tag_info.kind, tag_info.source, tag_info.source_format) == (
        "tag",
        "illust2vec_tag_ver200.caffemodel",
        "caffemodel-v2",
    )
    assert load_weights(written[2])[1].kind == "feature"
    sizes = {name: len(data) for name, data in served.files.items()}
    assert [(b.name, b.total, b.n, b.closed) for b in bars] == [
        ("tag_list.json.gz", sizes["/tag_list.json.gz"], sizes["/tag_list.json.gz"], True),
        ("illust2vec_tag_ver200.caffemodel", len(MODEL), len(MODEL), True),
        (
            "illust2vec_ver200.caffemodel",
            sizes["/illust2vec_ver200.caffemodel"],
            sizes["/illust2vec_ver200.caffemodel"],
            True,
        ),
    ]

    # Everything is there: a second run fetches nothing.
    count = len(served.requests)
    assert fetch_release(tmp_path / "w", base_url=base) == written
    assert len(served.requests) == count


def test_fetch_release_base_url_from_environment(
    tmp_path: Path, server: tuple[str, Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, served = server
    _release(served)
    monkeypatch.setenv("I2V_BASE_URL", base.rstrip("/"))  # a missing final slash is fine
    written = fetch_release(tmp_path, which=("tag",))
    assert [p.name for p in written] == ["tag_list.json", "illust2vec_tag_ver200.safetensors"]
    assert [path for path, _ in served.requests] == ["/tag_list.json.gz", "/illust2vec_tag_ver200.caffemodel"]


def test_release_url() -> None:
    assert RELEASE_BASE_URL == "https://github.com/rezoo/illustration2vec/releases/download/v2.0.0/"
    assert dl.RELEASE_FILES == ("illust2vec_tag_ver200.caffemodel", "illust2vec_ver200.caffemodel", "tag_list.json.gz")


def test_fetch_release_bad_tag_list(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    _release(served, tags=["1girl", "solo", "smile"])
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=base)
    assert str(exc.value) == f"{base}tag_list.json.gz: the tag list holds 3 tags; Illustration2Vec's list has 1539"
    assert list(tmp_path.iterdir()) == [tmp_path / "tag_list.json.gz"]


def test_fetch_release_tag_list_not_gzip(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    _release(served)
    served.files["/tag_list.json.gz"] = b"<html>rate limited</html>"
    with pytest.raises(DownloadError, match=r"tag_list\.json\.gz is not a gzip file"):
        fetch_release(tmp_path, base_url=base)


def test_fetch_release_wrong_kind(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    _release(served)
    served.files["/illust2vec_tag_ver200.caffemodel"] = served.files["/illust2vec_ver200.caffemodel"]
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=base, which=("tag",))
    assert (
        str(exc.value)
        == f"{base}illust2vec_tag_ver200.caffemodel holds a feature model, not the tag model its name says"
    )
    assert not (tmp_path / "illust2vec_tag_ver200.safetensors").exists()


def test_fetch_release_corrupt_model(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    _release(served)
    served.files["/illust2vec_ver200.caffemodel"] = b"<html>Bad gateway</html>"
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=base, which=("feature",))
    caffemodel = tmp_path / "illust2vec_ver200.caffemodel"
    assert str(exc.value).startswith(
        f"{base}illust2vec_ver200.caffemodel did not give a usable caffemodel (removed; run again): "
        f"{caffemodel} is not a weight file: it looks like a text file"
    )
    assert not caffemodel.exists()
    assert not (tmp_path / "illust2vec_ver200.safetensors").exists()
