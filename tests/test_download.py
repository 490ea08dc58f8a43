"""Downloads against a real loopback HTTP server: whole files, resuming, servers ignoring Range, failures,
and fetching a release (tag list + caffemodels converted to safetensors)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from i2v_cli import download as dl
from i2v_cli.download import RELEASE_BASE_URL, download, fetch_release
from i2v_cli.errors import DownloadError, I2VWarning, ServerUnreachableError
from i2v_cli.weights import load_weights

MODELS = Path(__file__).parent / "data" / "golden" / "models"
MODEL = (MODELS / "tag_v2.caffemodel").read_bytes()
FEATURE_MODEL = (MODELS / "feature_v1.caffemodel").read_bytes()
SHA = hashlib.sha256(MODEL).hexdigest()


@dataclass
class Served:
    """What the loopback server serves and how it misbehaves; it records each request.

    Like GitHub's release storage it sends a strong ETag (the content's hash) and a Last-Modified date and
    honours ``If-Range`` (RFC 9110: a Range applies only while the validator still matches)."""

    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    ignore_if_range: bool = False  # apply Range even when If-Range no longer matches (a broken server or proxy)
    validators: bool = True  # send ETag and Last-Modified
    cut_after: int | None = None  # send only this many body bytes of the next response, then hang up
    stall_after: int | None = None  # send this many body bytes of the next response, then wait for `release`
    finish_after_stall: bool = False  # once released, send the rest of the body (else hang up)
    release: threading.Event = field(default_factory=threading.Event)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    if_ranges: list[str | None] = field(default_factory=list)  # If-Range header per request
    sent: list[int] = field(default_factory=list)  # body bytes sent per response


def etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


class Handler(BaseHTTPRequestHandler):
    served: Served

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        served = self.served
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        served.requests.append((self.path, rng))
        served.if_ranges.append(if_range)
        data = served.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        if if_range is not None and if_range != etag(data) and not served.ignore_if_range:
            rng = None  # the file changed since the client started: it gets the whole new file
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
        if served.validators:
            self.send_header("ETag", etag(data))
            self.send_header("Last-Modified", "Wed, 21 Oct 2015 07:28:00 GMT")
        self.end_headers()
        if served.cut_after is not None:
            body, served.cut_after = body[: served.cut_after], None
        if served.stall_after is not None:
            stall, served.stall_after = served.stall_after, None
            self.wfile.write(body[:stall])
            self.wfile.flush()
            served.release.wait(10)
            if not served.finish_after_stall:
                return
            self.wfile.write(body[stall:])
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
    assert json.loads((tmp_path / "m.caffemodel.part.json").read_text())["etag"] == etag(MODEL)

    download(base + "m.caffemodel", dest)
    assert dest.read_bytes() == MODEL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.caffemodel"]
    assert served.requests[-1] == ("/m.caffemodel", "bytes=700000-")
    assert served.if_ranges[-1] == etag(MODEL)
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
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", bar, sha256=SHA)  # resumable: the hash checks it
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
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", bar, sha256=SHA)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.requests == [("/m.caffemodel", "bytes=39-")]
    assert (bar.resets, bar.n) == (0, len(MODEL))


def test_complete_partial_file_is_finished_by_416(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL)
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", sha256=SHA)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.sent == []


def test_partial_file_longer_than_the_file_restarts(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL + b"junk")
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", sha256=SHA)
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


def test_a_url_of_no_known_scheme_is_one_line(tmp_path: Path) -> None:
    """`--base-url notaurl` was a ValueError traceback ('unknown url type')."""
    with pytest.raises(DownloadError, match="cannot reach notaurl/x: unknown url type"):
        download("notaurl/x", tmp_path / "x", timeout=5)


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


def _release(served: Served) -> None:
    served.files["/illust2vec_tag_ver200.caffemodel"] = MODEL
    served.files["/illust2vec_ver200.caffemodel"] = FEATURE_MODEL


@pytest.fixture
def pins(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """The release's pinned hashes, pointed at the golden models that the loopback server serves as the release."""
    table = {
        "illust2vec_tag_ver200.caffemodel": SHA,
        "illust2vec_ver200.caffemodel": hashlib.sha256(FEATURE_MODEL).hexdigest(),
    }
    monkeypatch.setattr(dl, "RELEASE_SHA256", table)
    return table


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_fetch_release(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    base, served = server
    _release(served)
    bars: list[FakeBar] = []

    def factory(name: str, total: int | None) -> FakeBar:
        bars.append(FakeBar(name, total))
        return bars[-1]

    written = fetch_release(tmp_path / "w", base_url=base, progress_factory=factory)
    assert written == [
        tmp_path / "w" / "illust2vec_tag_ver200.safetensors",
        tmp_path / "w" / "illust2vec_ver200.safetensors",
    ]
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == sorted(p.name for p in written)  # caffemodels gone
    tag_info = load_weights(written[0])[1]
    assert (tag_info.kind, tag_info.source, tag_info.source_format, tag_info.sha256) == (
        "tag",
        "illust2vec_tag_ver200.caffemodel",
        "caffemodel-v2",
        SHA,
    )
    assert load_weights(written[1])[1].kind == "feature"
    assert [(b.name, b.total, b.n, b.closed) for b in bars] == [
        ("illust2vec_tag_ver200.caffemodel", len(MODEL), len(MODEL), True),
        ("illust2vec_ver200.caffemodel", len(FEATURE_MODEL), len(FEATURE_MODEL), True),
    ]

    # Everything is there: a second run fetches nothing.
    count = len(served.requests)
    assert fetch_release(tmp_path / "w", base_url=base) == written
    assert len(served.requests) == count


def test_two_downloads_into_one_folder_take_turns(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    """Two downloads into one folder shared its .part file: each truncated and removed the other's, and both
    failed, blaming the server. The second now waits (saying so) and finds the model the first converted."""
    base, served = server
    _release(served)
    served.stall_after, served.finish_after_stall = len(MODEL) // 2, True  # the first run pauses halfway
    first: list[object] = []
    thread = threading.Thread(target=lambda: first.append(fetch_release(tmp_path, base, which=["tag"])))
    thread.start()
    for _ in range(500):
        if served.requests:
            break
        time.sleep(0.01)
    releaser = threading.Timer(0.5, served.release.set)
    releaser.start()
    try:
        with pytest.warns(I2VWarning, match=f"another i2v is downloading into {tmp_path}: waiting"):
            second = fetch_release(tmp_path, base, which=["tag"])
    finally:
        releaser.join()
        thread.join(20)
    assert first == [second] and second == [tmp_path / "illust2vec_tag_ver200.safetensors"]
    assert load_weights(second[0])[1].sha256 == SHA
    assert len(served.requests) == 1  # the first run's: none for the second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["illust2vec_tag_ver200.safetensors"]


def test_fetch_release_base_url_from_environment(
    tmp_path: Path, server: tuple[str, Served], monkeypatch: pytest.MonkeyPatch, pins: dict
) -> None:
    base, served = server
    _release(served)
    monkeypatch.setenv("I2V_BASE_URL", base.rstrip("/"))  # a missing final slash is fine
    written = fetch_release(tmp_path, which=("tag",))
    assert [p.name for p in written] == ["illust2vec_tag_ver200.safetensors"]
    assert [path for path, _ in served.requests] == ["/illust2vec_tag_ver200.caffemodel"]


def test_release_files_and_pins() -> None:
    """Only the two caffemodels are fetched (the tag list ships with i2v); both have a pinned SHA-256."""
    assert RELEASE_BASE_URL == "https://github.com/rezoo/illustration2vec/releases/download/v2.0.0/"
    assert dl.RELEASE_FILES == ("illust2vec_tag_ver200.caffemodel", "illust2vec_ver200.caffemodel")
    assert sorted(dl.RELEASE_SHA256) == sorted(dl.RELEASE_FILES)
    for value in dl.RELEASE_SHA256.values():
        assert value is None or (len(value) == 64 and int(value, 16) >= 0)


def test_the_tag_list_is_not_downloaded(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    """Issue 13.11: the release's tag_list.json.gz was fetched and never used: i2v uses its packaged list."""
    base, served = server
    _release(served)
    fetch_release(tmp_path, base_url=base)
    assert [path for path, _ in served.requests] == [
        "/illust2vec_tag_ver200.caffemodel",
        "/illust2vec_ver200.caffemodel",
    ]
    assert not (tmp_path / "tag_list.json").exists()


def test_fetch_release_wrong_kind(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    base, served = server
    _release(served)
    served.files["/illust2vec_tag_ver200.caffemodel"] = FEATURE_MODEL
    pins["illust2vec_tag_ver200.caffemodel"] = None  # not pinned: the kind check is what catches it
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=base, which=("tag",))
    assert (
        str(exc.value)
        == f"{base}illust2vec_tag_ver200.caffemodel holds a feature model, not the tag model its name says"
    )
    assert list(tmp_path.iterdir()) == []


def test_fetch_release_corrupt_model(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    base, served = server
    _release(served)
    served.files["/illust2vec_ver200.caffemodel"] = b"<html>Bad gateway</html>"
    pins["illust2vec_ver200.caffemodel"] = None
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=base, which=("feature",))
    assert str(exc.value).startswith(
        f"{base}illust2vec_ver200.caffemodel did not give a usable caffemodel (removed; run again): "
        "illust2vec_ver200.caffemodel is not a weight file: it looks like a text file"
    )
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------
# Downloads are checked (issue 13.11) and resume only onto the same file (issue 14.7)


@pytest.mark.parametrize("via", ["release", "mirror"])
def test_a_file_that_is_not_the_release_is_refused(
    tmp_path: Path, server: tuple[str, Served], pins: dict, via: str
) -> None:
    """A server (the release's or a --base-url mirror) sending other bytes than the pinned ones: refused, removed."""
    base, served = server
    _release(served)
    forged = bytearray(MODEL)
    forged[-10] ^= 1  # one flipped bit in a weight: still a valid caffemodel of the right kind
    served.files["/illust2vec_tag_ver200.caffemodel"] = bytes(forged)
    url = base if via == "release" else base + "mirror/"
    if via == "mirror":
        served.files["/mirror/illust2vec_tag_ver200.caffemodel"] = bytes(forged)
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=url, which=("tag",))
    got = hashlib.sha256(forged).hexdigest()
    assert str(exc.value) == (
        f"{url}illust2vec_tag_ver200.caffemodel is not the expected file: its SHA-256 is {got}, the release's is "
        f"{SHA} (a damaged download, or a server sending another file); removed it"
    )
    assert list(tmp_path.iterdir()) == []


def test_resume_after_the_file_changed_gets_the_new_file_whole(tmp_path: Path, server: tuple[str, Served]) -> None:
    """Issue 14.7: the .part of the old file is not spliced with the new file's bytes (If-Range did it)."""
    base, served = server
    old, new = FEATURE_MODEL, MODEL
    served.files["/m.caffemodel"] = old
    served.cut_after = 500_000
    with pytest.raises(DownloadError):
        download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    served.files["/m.caffemodel"] = new  # the server's file changes between the two attempts
    download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    assert (tmp_path / "m.caffemodel").read_bytes() == new
    assert served.requests[-1] == ("/m.caffemodel", "bytes=500000-")
    assert served.if_ranges[-1] == etag(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.caffemodel"]


def test_resume_from_a_server_that_ignores_if_range(tmp_path: Path, server: tuple[str, Served]) -> None:
    """A server (or proxy) applying Range although the file changed: its new ETag gives it away, restart."""
    base, served = server
    served.ignore_if_range = True
    served.files["/m.caffemodel"] = FEATURE_MODEL
    served.cut_after = 500_000
    with pytest.raises(DownloadError):
        download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    served.files["/m.caffemodel"] = MODEL
    download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert [rng for _, rng in served.requests] == [None, "bytes=500000-", None]


def test_no_validator_no_pin_means_no_resume(tmp_path: Path, server: tuple[str, Served]) -> None:
    """Without an ETag/Last-Modified from the server and without a pinned hash, nothing proves the .part is of the
    same file: it is fetched again from zero rather than spliced."""
    base, served = server
    served.validators = False
    served.files["/m.caffemodel"] = FEATURE_MODEL
    served.cut_after = 500_000
    with pytest.raises(DownloadError):
        download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    served.files["/m.caffemodel"] = MODEL
    download(base + "m.caffemodel", tmp_path / "m.caffemodel")
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert [rng for _, rng in served.requests] == [None, None]


def test_a_stale_part_is_caught_by_the_pinned_hash(tmp_path: Path, server: tuple[str, Served]) -> None:
    """A .part of another file with no validator (an older i2v, a copy): resumed, found wrong by its hash,
    fetched again whole, once."""
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(FEATURE_MODEL[:300_000])
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", sha256=SHA)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert [rng for _, rng in served.requests] == ["bytes=300000-", None]


def test_a_checked_complete_part_needs_no_request(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    (tmp_path / "m.caffemodel.part").write_bytes(MODEL)
    (tmp_path / "m.caffemodel.part.json").write_text(json.dumps({"url": "x", "size": len(MODEL)}))
    download(base + "m.caffemodel", tmp_path / "m.caffemodel", sha256=SHA)
    assert (tmp_path / "m.caffemodel").read_bytes() == MODEL
    assert served.requests == []


def test_download_through_a_symlink_and_not_into_a_pipe(tmp_path: Path, server: tuple[str, Served]) -> None:
    base, served = server
    served.files["/m.caffemodel"] = MODEL
    real = tmp_path / "store" / "m.caffemodel"
    real.parent.mkdir()
    link = tmp_path / "m.caffemodel"
    link.symlink_to(real)
    download(base + "m.caffemodel", link)
    assert link.is_symlink() and real.read_bytes() == MODEL
    assert sorted(p.name for p in real.parent.iterdir()) == ["m.caffemodel"]
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(DownloadError) as exc:
        download(base + "m.caffemodel", fifo)
    assert str(exc.value) == f"{fifo} is not a regular file (a device or a pipe): download to a file"
    assert fifo.is_fifo()


# ------------------------------------------------------------------------------------------------------------
# What is already in --dir is used without the network, and never deleted (issues 13.11, 14.4)


def test_a_caffemodel_the_user_put_there_is_converted_and_kept(tmp_path: Path, pins: dict) -> None:
    local = tmp_path / "illust2vec_tag_ver200.caffemodel"
    local.write_bytes(MODEL)
    written = fetch_release(tmp_path, base_url=_closed_port_url(), which=("tag",))  # no server: not needed
    assert written == [tmp_path / "illust2vec_tag_ver200.safetensors"]
    assert local.read_bytes() == MODEL
    assert load_weights(written[0])[1].source == "illust2vec_tag_ver200.caffemodel"


def test_a_truncated_caffemodel_the_user_put_there_is_blamed_and_kept(tmp_path: Path, pins: dict) -> None:
    local = tmp_path / "illust2vec_ver200.caffemodel"
    local.write_bytes(FEATURE_MODEL[:900_000])
    url = _closed_port_url()
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=url, which=("feature",))
    message = str(exc.value)
    assert message.startswith(f"{local} is not a valid caffemodel (truncated or corrupt: ")
    assert message.endswith(
        "(found in the download folder, not downloaded: it was left as it is; delete or move it to download the "
        "release's)"
    )
    assert url not in message and "\n" not in message
    assert local.read_bytes() == FEATURE_MODEL[:900_000]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["illust2vec_ver200.caffemodel"]


def test_a_caffemodel_that_is_not_the_release_is_refused_and_kept(tmp_path: Path, pins: dict) -> None:
    local = tmp_path / "illust2vec_tag_ver200.caffemodel"
    local.write_bytes(MODEL)
    pins["illust2vec_tag_ver200.caffemodel"] = "0" * 64
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=_closed_port_url(), which=("tag",))
    target = tmp_path / "illust2vec_tag_ver200.safetensors"
    assert str(exc.value) == (
        f"{local} is not the release's file (its SHA-256 is {SHA}, the release's is {'0' * 64}); it was left as it "
        f"is; delete or move it to download the release's, or convert it yourself: i2v weights convert {local} -o "
        f"{target}"
    )
    assert local.read_bytes() == MODEL and not target.exists()


def test_a_converted_model_of_the_wrong_kind_is_not_taken(tmp_path: Path, pins: dict) -> None:
    from i2v_cli.weights import convert

    wrong = tmp_path / "illust2vec_tag_ver200.safetensors"
    convert(MODELS / "feature_v1.caffemodel", wrong)
    with pytest.raises(DownloadError) as exc:
        fetch_release(tmp_path, base_url=_closed_port_url(), which=("tag",))
    assert str(exc.value).startswith(f"{wrong} is a feature model (encode1); `i2v tag` needs the tag model")
    assert str(exc.value).endswith("(found in the download folder: delete it to download the model again)")


def test_unreachable_server_says_what_to_do(tmp_path: Path, pins: dict) -> None:
    url = _closed_port_url()
    with pytest.raises(ServerUnreachableError) as exc:
        fetch_release(tmp_path / "w", base_url=url, which=("feature",))
    target = tmp_path / "w" / "illust2vec_ver200.safetensors"
    assert str(exc.value).startswith(f"cannot reach {url}illust2vec_ver200.caffemodel: ")
    assert str(exc.value).endswith(
        ". Without this server: use a mirror (--base-url URL, or $I2V_BASE_URL), or download "
        f"illust2vec_ver200.caffemodel by hand, put it in {tmp_path / 'w'} and run this again (or: i2v weights "
        f"convert illust2vec_ver200.caffemodel -o {target})"
    )


def test_keep_caffemodels(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    base, served = server
    _release(served)
    fetch_release(tmp_path, base_url=base, which=("tag",), keep_caffemodels=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "illust2vec_tag_ver200.caffemodel",
        "illust2vec_tag_ver200.safetensors",
    ]
    assert (tmp_path / "illust2vec_tag_ver200.caffemodel").read_bytes() == MODEL


def test_cli_download_bar_shows_scaled_units(tmp_path: Path, server: tuple[str, Served], pins: dict) -> None:
    """Issue 13.13: 1.82M/1.82M and MB/s, not 1909833/1909833 and 808316870.96B/s."""
    from click.testing import CliRunner

    from i2v_cli.cli import cli

    base, served = server
    _release(served)
    result = CliRunner().invoke(
        cli, ["weights", "download", "--dir", str(tmp_path), "--only", "tag", "--base-url", base, "--progress"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'illust2vec_tag_ver200.safetensors'}\n"
    assert f"{len(MODEL) / 1024**2:.2f}M/{len(MODEL) / 1024**2:.2f}M" in result.stderr
    assert str(len(MODEL)) not in result.stderr
