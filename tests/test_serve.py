"""``i2v serve``: a real uvicorn server on a free loopback port, called over HTTP, against the CLI's own outputs."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install '.[serve]')")

from serve_helpers import Client, free_socket, multipart, running, wait_until_healthy

from i2v_cli.cli import cli
from i2v_cli.errors import I2VError
from i2v_cli.serve.app import create_app
from i2v_cli.serve.batcher import Batcher
from i2v_cli.serve.guard import Throttle, check_bind, is_loopback, token_ok
from i2v_cli.serve.service import Settings, load_service

LIMIT = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def collection(tmp_path_factory, golden):
    """The 12 golden images in one folder (a00 ... a11), and an index of them."""
    folder = tmp_path_factory.mktemp("serve") / "imgs"
    folder.mkdir()
    for i, rel in enumerate((golden / "expected" / "order.txt").read_text().split()):
        shutil.copy(golden / rel, folder / f"a{i:02d}{os.path.splitext(rel)[1]}")
    return folder


@pytest.fixture(scope="module")
def db(collection, tag_weights, feature_weights):
    path = collection.parent / "collection.db"
    result = CliRunner().invoke(cli, ["index", str(collection), "--db", str(path), "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def base(db, tag_weights, feature_weights):
    settings = Settings(max_batch=8, max_wait_ms=2, max_upload_bytes=LIMIT, max_files=16)
    service = load_service(str(tag_weights), str(feature_weights), db=str(db), device="cpu", settings=settings)
    with running(create_app(service)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return Client(base)


def images(collection):
    return sorted(collection.iterdir())


def assert_same_records(served, expected, tol=1e-6):
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert got.keys() == want.keys()
        assert got["path"] == want["path"]
        for key, value in want.items():
            if isinstance(value, dict):
                assert list(got[key]) == list(value), key  # same tags, same order
                np.testing.assert_allclose(list(got[key].values()), list(value.values()), atol=tol, rtol=0)
            elif key == "feature":
                np.testing.assert_allclose(got[key], value, atol=tol, rtol=0)
            else:
                assert got[key] == value


# Records: the same as the CLI's ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [[], ["-t", "0.05", "--top-k", "3"], ["--general-threshold", "0.2"]])
def test_tag_records_equal_i2v_tag(client, collection, tag_weights, options):
    paths = images(collection)
    cli_out = CliRunner().invoke(cli, ["tag", *map(str, paths), "-f", "json", "-w", str(tag_weights), "-j", "0",
                                       *options])  # fmt: skip
    assert cli_out.exit_code == 0, cli_out.output
    query = {"-t": "threshold", "--top-k": "top_k", "--general-threshold": "general_threshold"}
    qs = "&".join(f"{query[options[i]]}={options[i + 1]}" for i in range(0, len(options), 2))
    reply = client.post_files(f"/v1/tag?{qs}", [(str(p), p.read_bytes()) for p in paths])
    assert reply.status == 200, reply.body
    assert_same_records(reply.json()["records"], json.loads(cli_out.stdout))


@pytest.mark.parametrize("binary", [False, True])
def test_feature_records_equal_i2v_features(client, collection, feature_weights, binary):
    paths = images(collection)[:5]
    args = ["features", *map(str, paths), "-f", "jsonl", "-w", str(feature_weights), "-j", "0"]
    cli_out = CliRunner().invoke(cli, args + (["--binary"] if binary else []))
    assert cli_out.exit_code == 0, cli_out.output
    reply = client.post_files(f"/v1/features?binary={str(binary).lower()}", [(str(p), p.read_bytes()) for p in paths])
    assert reply.status == 200, reply.body
    expected = [json.loads(line) for line in cli_out.stdout.splitlines()]
    assert_same_records(reply.json()["records"], expected, tol=0 if binary else 1e-6)


def test_concurrent_requests_get_their_own_records(client, collection):
    """Sixteen clients at once: batched together, each gets exactly its own image's record."""
    paths = images(collection)
    single = {p.name: client.post_files("/v1/tag?threshold=0", [(p.name, p.read_bytes())]).json()["records"][0]
              for p in paths}  # fmt: skip
    got: dict[int, dict] = {}

    def call(i: int) -> None:
        p = paths[i % len(paths)]
        got[i] = client.post_files("/v1/tag?threshold=0", [(p.name, p.read_bytes())]).json()["records"][0]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(16):
        assert_same_records([got[i]], [single[paths[i % len(paths)].name]])
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["batches"]["images"] >= 16 + len(paths)


# Bad uploads: 4xx with a JSON error, the server stays up ------------------------------------------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (and holds no pixels): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty file"),
        ("truncate", "truncated"),
        (b"hello, this is text\n", "a text file, not an image"),
        (b"\x00\x01\x02garbage" * 10, "not an image"),
        (png_header(40000, 40000), "decompression bomb"),
    ],
    ids=["empty", "truncated", "text", "binary-junk", "pixel-bomb"],
)
def test_bad_upload_is_a_4xx_json_error(client, collection, data, message):
    if data == "truncate":
        data = images(collection)[1].read_bytes()[:2000]
    reply = client.post_files("/v1/tag", [("bad.png", data)])
    assert reply.status == 422
    body = reply.json()
    assert message in body["error"] and body["error"].startswith("bad.png: ")
    assert body["records"] == [{"path": "bad.png", "error": body["error"]}]
    assert "/tmp" not in body["error"]  # named by the client's name, not the server's temporary file
    assert client.get("/healthz").status == 200


def test_one_bad_image_among_good_ones_is_its_error_record(client, collection):
    good = images(collection)[0]
    reply = client.post_files("/v1/tag", [(good.name, good.read_bytes()), ("x.png", b"")])
    assert reply.status == 200
    records = reply.json()["records"]
    assert records[0]["path"] == good.name and "general" in records[0]
    assert records[1] == {"path": "x.png", "error": "x.png: empty file (0 bytes)"}


def raw_request(base: str, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send a request as raw bytes and read the status and JSON body (the server may answer before the body)."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.connect()
    conn.sock.sendall(head + body)
    resp = http.client.HTTPResponse(conn.sock, method="POST")
    resp.begin()
    status, payload = resp.status, json.loads(resp.read())
    conn.close()
    return status, payload


def test_over_the_size_limit_is_413(base, client):
    # Declared too large: refused from the header, before any byte of the body is read.
    head = (f"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {LIMIT + 1}\r\n\r\n").encode()  # fmt: skip
    status, payload = raw_request(base, head)
    assert status == 413 and "limit" in payload["error"]
    # Chunked, no length: counted while read, refused once over.
    head = (
        b"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"\x00" * (1 << 20)
    body = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") * (LIMIT // len(piece) + 1) + b"0\r\n\r\n"
    status, payload = raw_request(base, head, body)
    assert status == 413 and "over the limit" in payload["error"]
    assert client.get("/healthz").status == 200


def test_client_mistakes_are_4xx_json(client, collection):
    good = images(collection)[0]
    cases = [
        client.post_files("/v1/tag?threshold=2", [(good.name, good.read_bytes())]),
        client.post_files("/v1/tag?top_k=0", [(good.name, good.read_bytes())]),
        client.request("POST", "/v1/tag", b"not multipart", {"Content-Type": "text/plain"}),
        client.post_files("/v1/tag", [(f"{i}.png", b"") for i in range(17)]),  # over max_files
        client.get("/v1/search?q=no_such_tag_at_all"),
        client.get("/v1/search?q=%22unbalanced"),
        client.get("/v1/search?k=0"),
        client.post_json("/v1/search", {"q": 3, "k": "many"}),
        client.get("/no/such/route"),
    ]
    for reply in cases:
        assert 400 <= reply.status < 500, reply.body
        assert isinstance(reply.json()["error"], str) and reply.json()["error"]
    assert client.get("/healthz").json()["status"] == "ok"


# Token and loopback ---------------------------------------------------------------------------------------------


def test_token_check():
    assert token_ok(None, None)
    assert token_ok("s3cret", "Bearer s3cret") and token_ok("s3cret", "bearer  s3cret ")
    assert not token_ok("s3cret", None) and not token_ok("s3cret", "Bearer wrong") and not token_ok("s3cret", "s3cret")
    assert not token_ok("s3cret", "Basic s3cret") and not token_ok("s3cret", "Bearer \udcff")
    assert token_ok("s3cret", None, cookie="s3cret")
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(I2VError, match="--token"):
            check_bind(host, None)
        check_bind(host, "s3cret")


def test_cli_refuses_a_public_host_without_token(tag_weights, feature_weights, monkeypatch):
    monkeypatch.delenv("I2V_TOKEN", raising=False)
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights)])  # fmt: skip
    assert result.exit_code == 2
    assert "--token" in result.output and "Traceback" not in result.output


def test_bearer_token_required_on_every_api_call(db, tag_weights, feature_weights, collection):
    service = load_service(str(tag_weights), str(feature_weights), db=str(db), device="cpu", settings=Settings())
    good = images(collection)[0]
    with running(create_app(service, token="s3cret")) as url:
        anonymous, wrong, right = Client(url), Client(url, "nope"), Client(url, "s3cret")
        for c, status in ((anonymous, 401), (wrong, 401), (right, 200)):
            assert c.post_files("/v1/tag", [(good.name, good.read_bytes())]).status == status
            assert c.get("/v1/search?q=").status == status
            assert c.get("/v1/images/1/thumb").status == status
        assert anonymous.get("/healthz").status == 200  # the health check stays open
        assert anonymous.get("/").status == 401 and b"token" in anonymous.get("/").body  # the sign-in form
        # A non-loopback Host header is accepted with a token (the server may be behind a name).
        assert right.get("/v1/search?q=", headers={"Host": "tagger.example.org"}).status == 200


def test_pages_of_other_origins_cannot_post(db, tag_weights, feature_weights, collection):
    """A page on any site could make the browser post wrong tokens to /login (20 of them locked every real client out
    for a minute) and images to the API: a browser's cross-origin POST is refused before anything is counted, while
    the page's own posts, scripts (no Origin) and a proxy's forwarded host pass. Nothing may be embedded elsewhere."""
    service = load_service(str(tag_weights), str(feature_weights), db=str(db), device="cpu", settings=Settings())
    good = images(collection)[0]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    with running(create_app(service, token="s3cret")) as url:
        anonymous, right = Client(url), Client(url, "s3cret")
        netloc = url.split("://", 1)[1]
        foreign = [
            {"Origin": "http://evil.example"},
            {"Origin": "null"},  # a sandboxed frame, a data: URL
            {"Origin": f"http://{netloc.replace('127.0.0.1', 'localhost')}"},  # another origin on this machine
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},
        ]
        for headers in foreign * 4:
            reply = anonymous.request("POST", "/login", b"token=x", {**form, **headers})
            assert reply.status == 403 and "another" in reply.json()["error"], headers
            assert right.post_files("/v1/tag", [(good.name, good.read_bytes())]).status == 200
            body, ctype = multipart([(good.name, good.read_bytes())])
            assert right.request("POST", "/v1/tag", body, {"Content-Type": ctype, **headers}).status == 403
        for headers in ({"Origin": f"http://{netloc}"}, {"Origin": f"HTTP://{netloc.upper()}"},
                        {"Origin": "https://tagger.example.org", "X-Forwarded-Host": "tagger.example.org"},
                        {"Sec-Fetch-Site": "same-origin"}, {}):  # fmt: skip
            reply = anonymous.request("POST", "/login", b"token=s3cret", {**form, **headers})
            # signed in: redirected to the page (urllib follows, without the cookie: the sign-in form again)
            assert reply.status == 401 and b"<form" in reply.body and b"wrong token" not in reply.body, headers
        assert right.get("/v1/search?q=").status == 200  # never throttled by the refused posts
        reply = right.get("/v1/images/1/thumb", headers={"Sec-Fetch-Site": "cross-site"})
        assert reply.status == 200 and reply.headers["cross-origin-resource-policy"] == "same-origin"
        assert anonymous.get("/healthz").headers["cross-origin-resource-policy"] == "same-origin"


def test_allowed_origins_behind_a_proxy_that_rewrites_host(tag_weights, feature_weights, collection):
    """nginx's default proxy_pass sends Host: 127.0.0.1:PORT and no X-Forwarded-Host: the page's own posts, from its
    public origin, were refused. --allow-origin names that origin; others stay refused, with the option named."""
    from i2v_cli.serve.guard import origin_of

    assert origin_of("HTTPS://Tagger.Example.org:443/") == "https://tagger.example.org"
    for bad in ("tagger.example.org", "ftp://x", "https://x/page"):
        with pytest.raises(I2VError, match="is not an origin"):
            origin_of(bad)
    result = CliRunner().invoke(cli, ["serve", "--allow-origin", "tagger.example.org", "--tag-weights",
                                      str(tag_weights), "--feature-weights", str(feature_weights)])  # fmt: skip
    assert result.exit_code == 2 and "is not an origin" in result.output and "Traceback" not in result.output
    service = load_service(str(tag_weights), str(feature_weights), device="cpu", settings=Settings())
    good = images(collection)[0]
    body, ctype = multipart([(good.name, good.read_bytes())])
    with running(create_app(service, allowed_origins=[origin_of("https://Tagger.example.org")])) as url:
        client = Client(url)
        for origin, status in (("https://tagger.example.org", 200), ("https://TAGGER.example.org:443", 200),
                               ("http://tagger.example.org", 403), ("https://evil.example", 403)):  # fmt: skip
            reply = client.request("POST", "/v1/tag", body, {"Content-Type": ctype, "Origin": origin})
            assert reply.status == status, origin
            if status == 403:
                assert "--allow-origin ORIGIN" in reply.json()["error"]


def test_loopback_server_refuses_foreign_host_names(client):
    """Without a token, a request naming another host (DNS rebinding from a web page) is refused."""
    reply = client.get("/v1/search?q=", headers={"Host": "evil.example.com:8000"})
    assert reply.status == 421
    assert client.get("/v1/search?q=", headers={"Host": "localhost:8000"}).status == 200


# The index: search, similar, images by id only ---------------------------------------------------------------


def test_search_equals_i2v_search(client, db):
    for query in ["", "rating:safe", "-rating:safe"]:
        cli_out = CliRunner().invoke(cli, ["search", "--db", str(db), "-f", "json", "--", query])
        assert cli_out.exit_code == 0, cli_out.output
        want = [r["path"] for r in json.loads(cli_out.stdout)]
        got = client.get(f"/v1/search?q={query}").json()["results"]
        assert [r["path"] for r in got] == want
        posted = client.post_json("/v1/search", {"q": query}).json()["results"]
        assert posted == got


def test_like_and_similar(client, collection):
    hits = client.get("/v1/search?q=").json()["results"]
    first = hits[0]
    like = client.get(f"/v1/search?like={first['id']}&k=3").json()["results"]
    assert len(like) == 3 and first["id"] not in [h["id"] for h in like]
    assert all(-1.0 <= h["score"] <= 1.0 for h in like)
    path = collection / os.path.basename(first["path"])
    similar = client.post_files("/v1/similar?k=4", [(path.name, path.read_bytes())]).json()["results"]
    assert similar[0]["id"] == first["id"] and similar[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["id"] for h in similar[1:]] == [h["id"] for h in like]
    bad = client.post_files("/v1/similar", [("x.png", b"junk")])
    assert bad.status == 422 and "x.png" in bad.json()["error"]


def test_images_by_id_only(client, collection):
    hits = client.get("/v1/search?q=").json()["results"]
    hit = hits[0]
    reply = client.get(f"/v1/images/{hit['id']}")
    assert reply.status == 200 and reply.body == Path(hit["path"]).read_bytes()
    assert reply.headers["x-content-type-options"] == "nosniff"
    thumb = client.get(f"/v1/images/{hit['id']}/thumb")
    assert thumb.status == 200 and thumb.body.startswith(b"\xff\xd8\xff")
    info = client.get(f"/v1/images/{hit['id']}/info").json()
    assert info["path"] == hit["path"] and "rating" in info
    for attempt in ["../../../../etc/passwd", "..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "-1", "0",
                    "999999", "1.5", "1%00", "1/../../../../etc/passwd", "/etc/passwd", "1e3"]:  # fmt: skip
        for suffix in ("", "/thumb", "/info"):
            reply = client.get(f"/v1/images/{attempt}{suffix}")
            assert reply.status in (404, 422), (attempt, suffix, reply.status)
            assert b"root:" not in reply.body and "error" in reply.json()


def test_a_file_changed_since_indexing_is_not_served(client, collection):
    hit = client.get("/v1/search?q=").json()["results"][-1]
    path = hit["path"]
    saved = Path(path).read_bytes()
    try:
        os.replace(path, path + ".bak")
        os.symlink("/etc/passwd", path)  # the indexed name now points elsewhere
        reply = client.get(f"/v1/images/{hit['id']}")
        assert reply.status == 404 and b"root:" not in reply.body
        assert client.get(f"/v1/images/{hit['id']}/thumb").status == 404
    finally:
        os.unlink(path)
        os.replace(path + ".bak", path)
    assert Path(path).read_bytes() == saved


def swap_in(path: Path, data: bytes, like: Path) -> None:
    """Write ``data`` to ``path`` and give it the mtime of ``like``."""
    path.write_bytes(data)
    st = like.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_symlink_or_folder_swapped_in_with_the_indexed_size_and_mtime_is_not_served(client, collection):
    """The indexed size and mtime were all that was checked, through symlinks: a symlink put in an indexed file's
    place, or a symlinked folder in its folder's, leading to another file of that size and mtime, had that file
    served (and thumbnailed)."""
    hit = client.get("/v1/search?q=").json()["results"][1]
    path = Path(hit["path"])
    size = path.stat().st_size
    secret_folder = collection.parent / "secret"
    secret_folder.mkdir()
    secret = secret_folder / path.name
    swap_in(secret, b"S" * size, path)
    try:
        os.replace(path, f"{path}.bak")
        os.symlink(secret, path)  # the file's name now leads to another file of the same size and mtime
        for suffix in ("", "/thumb"):
            reply = client.get(f"/v1/images/{hit['id']}{suffix}")
            assert reply.status == 404 and b"SSSS" not in reply.body, (suffix, reply.status)
            assert "changed since it was indexed" in reply.json()["error"]
        os.unlink(path)
        os.replace(f"{path}.bak", path)
        os.replace(collection, f"{collection}.bak")
        os.symlink(secret_folder, collection)  # the folder's name now leads to another folder
        assert Path(hit["path"]).read_bytes() == b"S" * size
        reply = client.get(f"/v1/images/{hit['id']}")
        assert reply.status == 404 and b"SSSS" not in reply.body
    finally:
        if collection.is_symlink():
            os.unlink(collection)
            os.replace(f"{collection}.bak", collection)
        if path.is_symlink():
            os.unlink(path)
            os.replace(f"{path}.bak", path)
        shutil.rmtree(secret_folder)
    reply = client.get(f"/v1/images/{hit['id']}")
    assert reply.status == 200 and reply.body == path.read_bytes()  # the indexed file back in its place: served


def test_files_indexed_through_symlinks_are_served(collection, tag_weights, feature_weights, tmp_path):
    """``i2v index`` indexes a symlink to an image, and a path through a symlinked folder, under the link's name:
    such files are served, while their bytes are the indexed ones."""
    real = tmp_path / "real"
    real.mkdir()
    first, second = images(collection)[:2]
    shutil.copy(first, real / first.name)
    (real / f"link{second.suffix}").symlink_to(second)  # a symlink to an image elsewhere
    (tmp_path / "via").symlink_to(real)  # and the folder indexed through a symlink
    db = tmp_path / "linked.db"
    weights = ["--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights)]
    result = CliRunner().invoke(cli, ["index", str(tmp_path / "via"), "--db", str(db), *weights, "-j", "0"])
    assert result.exit_code == 0, result.output
    from i2v_cli.index import Index
    from i2v_cli.serve.service import IndexReader, NotFound

    reader = IndexReader(Index(str(db), readonly=True))
    try:
        hits = reader.search("")
        assert sorted(os.path.basename(h["path"]) for h in hits) == sorted([first.name, f"link{second.suffix}"])
        for hit in hits:
            assert hit["path"].startswith(str(tmp_path / "via"))
            data, _ = reader.open_file(hit["id"])
            assert data == Path(hit["path"]).read_bytes()
            assert reader.thumbnail(hit["id"]).startswith(b"\xff\xd8\xff")
        copied = next(h for h in hits if not os.path.islink(h["path"]))
        st = os.stat(copied["path"])
        with open(copied["path"], "r+b") as f:  # other bytes, the same size and mtime: not the indexed file
            f.write(b"\0" * 16)
        os.utime(copied["path"], ns=(st.st_atime_ns, st.st_mtime_ns))
        with pytest.raises(NotFound, match="changed since it was indexed"):
            reader.open_file(copied["id"])
    finally:
        reader.close()


def test_files_that_failed_indexing_are_never_served(tag_weights, feature_weights, tmp_path):
    """A file that failed indexing (not an image: a text file named .png, a link to /etc/passwd) keeps its size,
    mtime and hash in the index, so the hash check passed and /v1/images/ID served it whole."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    (folder / "passwd.png").symlink_to(secret)
    (folder / "notes.png").write_text("not an image, a note\n")
    db = tmp_path / "failed.db"
    weights = ["--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights)]
    result = CliRunner().invoke(cli, ["index", str(folder), "--db", str(db), *weights, "-j", "0"])
    assert result.exit_code == 1, result.output  # both failed
    from i2v_cli.index import Index
    from i2v_cli.serve.service import IndexReader, NotFound

    reader = IndexReader(Index(str(db), readonly=True))
    try:
        ids = [row[0] for row in reader.index.conn.execute("SELECT id FROM images WHERE error IS NOT NULL")]
        assert len(ids) == 2
        for image in ids:
            with pytest.raises(NotFound, match=r"could not be indexed .*: it is not served"):
                reader.open_file(image)
            with pytest.raises(NotFound):
                reader.thumbnail(image)
    finally:
        reader.close()


def test_a_costly_query_stops_at_the_timeout_and_holds_no_one_else(db):
    """A query of thousands of terms ran SQLite for 20 s past --timeout, holding the index's lock, and /healthz, the
    page and every search waited behind it: its SQL now stops at the timeout (503), a request waits for the index at
    most that long, and the health check answers at once with the size it last saw."""
    import threading
    import time

    from i2v_cli.index import Index
    from i2v_cli.query import MAX_TERMS
    from i2v_cli.serve.service import Busy, IndexReader

    query = " ".join(f"solo>={i / 10**4:.4f}" for i in range(MAX_TERMS))
    reader = IndexReader(Index(str(db), readonly=True), timeout_s=1e-4)  # far less than the query's SQL takes
    try:
        with pytest.raises(Busy, match=r"took over 0\.0001 s"):
            reader.search(query)
        reader.timeout_s = None  # no timeout: the same query is answered
        assert reader.search(query) == reader.search(f"solo>={(MAX_TERMS - 1) / 10**4:.4f}")  # the strictest bound
        reader.timeout_s = 0.3
        images = reader.summary()["images"]
        held, release = threading.Event(), threading.Event()

        def long_request() -> None:
            with reader._turn():
                held.set()
                release.wait(10)

        thread = threading.Thread(target=long_request)
        thread.start()
        try:
            held.wait(5)
            start = time.monotonic()
            assert reader.summary() == {"images": images, "feature_dim": reader.index.feature_dim, "busy": True}
            with pytest.raises(Busy, match="busy with other requests"):
                reader.search("")
            assert time.monotonic() - start < 3
        finally:
            release.set()
            thread.join()
        assert len(reader.search("")) == images and "busy" not in reader.summary()
    finally:
        reader.close()


def test_a_huge_query_over_http_is_refused_or_its_repeats_dropped(client):
    from i2v_cli.query import MAX_TERMS

    many = " ".join(f"solo>={i / 10**4:.4f}" for i in range(MAX_TERMS + 1))
    reply = client.post_json("/v1/search", {"q": many})
    assert reply.status == 400 and "at most 1000 are taken" in reply.json()["error"]
    reply = client.post_json("/v1/search", {"q": " ".join(["rating:safe"] * 30000)})
    assert reply.status == 200


def test_similar_takes_one_image(client, collection):
    """Several images to /v1/similar were answered for the last one alone, silently."""
    first, second = images(collection)[:2]
    reply = client.post_files("/v1/similar", [(first.name, first.read_bytes()), (second.name, second.read_bytes())])
    assert reply.status == 422 and reply.json() == {
        "error": "/v1/similar takes one image; 2 were sent (one request per image)"
    }
    assert client.post_files("/v1/similar", [(first.name, first.read_bytes())]).status == 200


def test_errors_over_http_have_no_cli_advice(client):
    """A text upload's error advised `i2v tag - < FILE`, a command line an HTTP client has no use for."""
    reply = client.post_files("/v1/tag", [("notes.txt", b"a.png\nb.png\n")])
    assert reply.status == 422 and reply.json()["error"] == "notes.txt: a text file, not an image"


def test_a_multipart_body_cut_short_is_400(client, collection):
    """A multipart body cut before its closing boundary was a 422 "image: Field required", or was answered without
    its last image, unsaid (the form parser drops a part never closed)."""
    good = images(collection)[0]
    body, ctype = multipart([(good.name, good.read_bytes()), ("second.png", good.read_bytes())])
    whole = client.request("POST", "/v1/tag", body, {"Content-Type": ctype})
    assert whole.status == 200 and len(whole.json()["records"]) == 2
    boundary = ctype.split("boundary=")[1]
    closing = f"--{boundary}--\r\n".encode()
    assert body.endswith(closing)
    for cut in (body[: -len(closing)], body[: -len(closing) - 100], body[:60]):
        for route in ("/v1/tag", "/v1/features", "/v1/similar"):
            reply = client.request("POST", route, cut, {"Content-Type": ctype})
            assert reply.status == 400, (route, len(cut), reply.body)
            assert reply.json() == {"error": "the multipart body is malformed or incomplete (no closing boundary)"}
    assert client.get("/healthz").json()["status"] == "ok"


def test_page_lists_and_searches_the_index(client):
    page = client.get("/")
    assert page.status == 200 and page.body.count(b'class="') > 0
    assert page.body.count(b"/thumb") == 12
    none = client.get("/?q=rating:safe+-rating:safe")
    assert none.body.count(b"/thumb") == 0 and b"No image matches" in none.body
    bad = client.get("/?q=%3Cscript%3E")
    assert b"<script>" not in bad.body.replace(b'<script src="/static/page.js"></script>', b"")
    assert client.get("/static/page.js").status == 200
    assert client.get("/static/..%2F__init__.py").status == 404
    assert client.get("/openapi.json").json()["paths"]["/v1/tag"]


# The batcher ----------------------------------------------------------------------------------------------------


class Recorder:
    """A stand-in network that records the batch sizes it is given."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(x))
        return x.flatten(1)[:, :2].clone()


def test_batcher_gathers_up_to_max_batch():
    net = Recorder()
    batcher = Batcher({"tag": net}, torch.device("cpu"), max_batch=4, max_wait_ms=60_000)
    inputs = [torch.full((3, 2, 2), float(i)) for i in range(4)]
    futures = batcher.submit("tag", [f"i{i}" for i in range(4)], inputs)  # a full batch runs without waiting
    results = [f.result(timeout=30) for f in futures]
    assert net.sizes == [4]
    assert [r.path for r in results] == ["i0", "i1", "i2", "i3"]
    assert [r.output.tolist() for r in results] == [[float(i)] * 2 for i in range(4)]
    later = batcher.submit("tag", ["x"], [torch.zeros(3, 2, 2)])
    batcher.close()  # a queued image still runs on close
    assert later[0].result(timeout=30).output.tolist() == [0.0, 0.0] and net.sizes == [4, 1]


def test_batcher_non_finite_output_is_that_image_error():
    batcher = Batcher({"tag": lambda x: x.flatten(1) / 0}, torch.device("cpu"), max_batch=2, max_wait_ms=0)
    (result,) = [f.result(timeout=30) for f in batcher.submit("tag", ["a.png"], [torch.ones(3, 2, 2)])]
    batcher.close()
    assert result.output is None and "not finite" in result.error


# The command ----------------------------------------------------------------------------------------------------


def test_serve_command_stops_gracefully_on_sigterm(db, tag_weights, feature_weights, collection, tmp_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "i2v_cli", "serve", "--db", str(db), "--port", str(port), "--tag-weights",
         str(tag_weights), "--feature-weights", str(feature_weights), "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        client = Client(f"http://127.0.0.1:{port}")
        wait_until_healthy(client)
        good = images(collection)[0]
        assert client.post_files("/v1/tag", [(good.name, good.read_bytes())]).status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "i2v: serving http://127.0.0.1:" in err and "Traceback" not in err
    assert not any(p.name.startswith("i2v-serve-") for p in tmp_path.iterdir())  # its temporary folder removed


@pytest.mark.timeout(120)
def test_a_second_sigterm_forces_the_exit(db, tag_weights, feature_weights, tmp_path):
    """Only a second Ctrl-C forced the exit (uvicorn's rule): a second SIGTERM, what process managers send, was
    ignored while a request was in flight, and the server outlived their grace period (up to --timeout, 60 s)."""
    import socket

    proc = subprocess.Popen(
        [sys.executable, "-m", "i2v_cli", "serve", "--db", str(db), "--port", "0", "--tag-weights", str(tag_weights),
         "--feature-weights", str(feature_weights), "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        wait_until_healthy(Client(f"http://127.0.0.1:{port}"))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 100000\r\n\r\n--x\r\n")  # fmt: skip  # and the rest of the body trickles
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert proc.poll() is None  # the first waits for the request in flight
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert time.monotonic() - t < 5
        slow.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert not any(p.name.startswith("i2v-serve-") for p in tmp_path.iterdir())  # its temporary folder removed


# The web page in a real headless Chromium ---------------------------------------------------------------------

# The web page of ``i2v serve`` in a real headless Chromium (Debian's chromium and chromium-driver, driven by
# Selenium; skipped where either is missing). What it does, as a person would:
#
# 1. opens ``/``: the gallery must show a thumbnail for each of the 12 indexed images, each decoded by the browser;
# 2. types a query into the search box and submits it: the gallery must narrow to exactly the images the API's
#    ``/v1/search`` gives for that query;
# 3. clicks the first image: the side panel must show its path, its tags and its most similar images;
# 4. drops an image file on the page (a real ``drop`` event carrying a File): the panel must show the file's name
#    and the tags ``/v1/tag`` gives for it, then its nearest indexed neighbours.
#
# A screenshot of the last state goes to $I2V_SCREENSHOT (default /tmp/i2v-serve-page.png), never into the repo.

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no chromium/chromedriver here (Debian: apt-get install chromium chromium-driver; .ci/run does)",
)


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium", reason="selenium is not installed (pip install '.[browser]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d))


def tiles(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery a[data-id]")


def shown_tags(driver):
    """(category, tag, score) of each tag the side panel lists, in its order."""
    from selenium.webdriver.common.by import By

    return [(li.get_attribute("data-category"), li.find_element(By.CLASS_NAME, "tag").text,
             float(li.find_element(By.CLASS_NAME, "score").text))
            for li in driver.find_elements(By.CSS_SELECTOR, "#detail .tags li")]  # fmt: skip


def listed(record):
    """What the panel must list for a record: by category, best score first, scores to 3 decimals."""
    return [(c, t, round(s, 3)) for c in ("character", "copyright", "general", "rating")
            for t, s in sorted(record[c].items(), key=lambda kv: -kv[1])]  # fmt: skip


@needs_chromium
def test_page_in_chromium_gallery_search_click_and_drop(browser, base, client, collection):
    from selenium.webdriver.common.by import By

    # 1. The gallery: every indexed image, each thumbnail decoded by the browser.
    browser.get(base + "/")
    wait_for(browser, lambda d: len(tiles(d)) == 12)
    decoded = "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"
    wait_for(browser, lambda d: d.execute_script(decoded))

    # 2. A tag search narrows the gallery to what the API finds for the same query.
    counts = {q: len(client.get(f"/v1/search?q={q}").json()["results"])
              for q in ("rating:safe", "rating:questionable", "rating:explicit")}  # fmt: skip
    query = next(q for q, n in counts.items() if 0 < n < 12)
    box = browser.find_element(By.ID, "q")
    box.clear()
    box.send_keys(query)
    box.submit()
    wait_for(browser, lambda d: d.find_element(By.ID, "q").get_attribute("value") == query)
    wait_for(browser, lambda d: len(tiles(d)) == counts[query])
    expected = [str(h["id"]) for h in client.get(f"/v1/search?q={query}").json()["results"]]
    assert [t.get_attribute("data-id") for t in tiles(browser)] == expected

    # 3. A click shows the image's path, its tags and its most similar images.
    first = tiles(browser)[0]
    first.click()
    info = client.get(f"/v1/images/{first.get_attribute('data-id')}/info").json()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .neighbours img"))
    assert browser.find_element(By.CSS_SELECTOR, "#detail h2").text == info["path"]
    assert shown_tags(browser) == listed(info)
    assert "selected" in first.get_attribute("class")

    # 4. Dropping a file on the page shows its tags (as /v1/tag gives them) and its nearest neighbours.
    path = images(collection)[3]
    record = client.post_files("/v1/tag", [("dropped.png", path.read_bytes())]).json()["records"][0]
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
        document.dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
        """,
        base64.b64encode(path.read_bytes()).decode(),
    )
    wait_for(browser, lambda d: d.find_elements(By.ID, "upload-name"))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#detail .neighbours img"))
    assert browser.find_element(By.ID, "upload-name").text == "dropped.png"
    assert shown_tags(browser) == listed(record)
    assert browser.find_element(By.ID, "status").text == "Tagged dropped.png"
    browser.save_screenshot(os.environ.get("I2V_SCREENSHOT", "/tmp/i2v-serve-page.png"))


# A hostile client and a careless operator ----------------------------------------------------------------------


def test_ids_beyond_sqlite_and_long_queries_are_4xx_or_answers(client):
    """Ids above 2**63 were OverflowError 500s; a query of a thousand terms was an 'Expression tree is too large'
    500, on the page too."""
    huge = "99999999999999999999"
    for path in (f"/v1/images/{huge}", f"/v1/images/{huge}/thumb", f"/v1/images/{huge}/info",
                 f"/v1/search?like={huge}", f"/?page={huge}"):  # fmt: skip
        reply = client.get(path)
        assert reply.status == 422, (path, reply.body[:200])
    assert client.post_json("/v1/search", {"like": int(huge)}).status == 422
    query = "+".join(["long_hair"] * 1200)
    assert client.get(f"/v1/search?q={query}").status == 200
    assert client.get(f"/?q={query}").status == 200


@pytest.mark.timeout(60)
def test_a_fifo_as_db_and_a_token_no_client_can_send_are_one_line(tmp_path, tag_weights, feature_weights):
    """A FIFO as --db blocked the server in open() for ever, deaf to SIGTERM; a token of non-ASCII characters locked
    the whole API (no header could match it) and made /login a 500."""
    fifo = tmp_path / "fifo.db"
    os.mkfifo(fifo)
    weights = ["--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights), "--port", "0"]
    result = CliRunner().invoke(cli, ["serve", "--db", str(fifo), *weights])
    assert result.exit_code == 2 and "is not a regular file" in result.stderr, result.output
    result = CliRunner().invoke(cli, ["search", "--db", str(fifo), "solo"])
    assert result.exit_code == 2 and "is not a regular file" in result.stderr, result.output
    result = CliRunner().invoke(cli, ["serve", "--token", "p\u00e4ssw\u00f6rd", *weights])
    assert result.exit_code == 2 and "--token must be printable ASCII" in result.stderr, result.output


def test_a_port_in_use_is_one_line_before_the_models_load(tag_weights, feature_weights):
    """It printed 'serving ...', then uvicorn's own ERROR line, and exited 3 (documented as a failed write)."""
    taken = free_socket()
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        result = CliRunner().invoke(cli, ["serve", "--port", str(port), "--tag-weights", str(tag_weights),
                                          "--feature-weights", "/nonexistent"])  # fmt: skip
    finally:
        taken.close()
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1 port {port}" in result.stderr and "serving" not in result.stderr


@pytest.mark.timeout(120)
def test_port_0_a_late_request_head_and_the_connection_limit(db, tag_weights, feature_weights, tmp_path):
    """--port 0 announced port 0; a connection that sent nothing, or its headers slowly, was kept for ever (its
    slot too); nothing bounded the connections at once."""
    import socket

    proc = subprocess.Popen(
        [sys.executable, "-m", "i2v_cli", "serve", "--db", str(db), "--port", "0", "--timeout", "2",
         "--max-connections", "2", "--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights),
         "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        line = proc.stderr.readline()
        assert line.startswith("i2v: serving http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port != 0
        client = Client(f"http://127.0.0.1:{port}")
        wait_until_healthy(client)
        silent = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and the rest never comes
        time.sleep(0.3)
        over = client.get("/healthz")
        assert over.status == 503  # two connections held: the limit
        assert "--max-connections" in over.json()["error"] and over.headers["retry-after"] == "1"  # was plain text
        for sock in (silent, slow):
            sock.settimeout(10)
            t = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server
            assert time.monotonic() - t < 8
            sock.close()
        assert client.get("/healthz").status == 200  # their slots are free again
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(180)
def test_a_client_that_stops_reading_its_answer_loses_its_connection(tag_weights, feature_weights, tmp_path):
    """Clients that asked for a large image and never read the answer held their slots for ever: with two of them
    every other request was 503 until they left. Now a connection whose answer is not taken for --timeout (to twice
    that) is aborted. A request that is not HTTP gets a JSON 400 (it was plain text)."""
    import socket

    from PIL import Image

    folder = tmp_path / "big"
    folder.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (2500, 2500, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png", compress_level=0)  # 18.7 MB: far beyond the socket buffers
    db = tmp_path / "big.db"
    result = CliRunner().invoke(cli, ["index", str(folder), "--db", str(db), "--tag-weights", str(tag_weights),
                                      "--feature-weights", str(feature_weights), "-j", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "i2v_cli", "serve", "--db", str(db), "--port", str(port), "--timeout", "1",
         "--max-connections", "3", "--tag-weights", str(tag_weights), "--feature-weights", str(feature_weights),
         "--device", "cpu"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp_path)},
    )  # fmt: skip
    readers = []
    try:
        client = Client(f"http://127.0.0.1:{port}")
        wait_until_healthy(client)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.settimeout(10)
            raw.sendall(b"\x16\x03\x01 not http\r\n\r\n")  # a TLS hello, say
            reply = b""
            while chunk := raw.recv(65536):  # until the server closes
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 Bad Request") and b'{"error": "not an HTTP request' in reply
        for _ in range(2):
            r = socket.socket()
            r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            r.connect(("127.0.0.1", port))
            r.sendall(b"GET /v1/images/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never read
            readers.append(r)
        time.sleep(0.5)
        assert client.get("/healthz").status == 503  # the two readers and this one: the limit
        time.sleep(3)  # two periods of --timeout, and some
        assert client.get("/healthz").status == 200  # their slots are free again
        for r in readers:
            r.settimeout(10)
            got = 0
            with contextlib.suppress(ConnectionResetError):
                while chunk := r.recv(1 << 20):  # what the kernel still held, then the end
                    got += len(chunk)
            assert got < (folder / "noise.png").stat().st_size  # the answer was cut off
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM
    finally:
        for r in readers:
            r.close()
        if proc.poll() is None:
            proc.kill()


def test_an_answer_before_the_body_ends_the_connection(base):
    """413 from the declared length was sent on a connection left open with the body unread: a client reading the
    answer to the end of the connection waited until its own timeout."""
    import socket

    host, port = base.removeprefix("http://").split(":")
    head = (f"POST /v1/tag HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {LIMIT + 1}\r\n\r\n").encode()  # fmt: skip
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(10)
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes: a TimeoutError here is the bug
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"connection: close" in reply.lower()


def test_listening_sockets_bind_every_address_of_the_host_on_one_port():
    """Binding only getaddrinfo's first answer broke --host "" (all interfaces) and made --host :: answer on IPv4
    too; asyncio, which uvicorn used before, binds each address, IPv6 ones IPv6-only."""
    import socket

    from i2v_cli.serve.guard import listening_sockets

    socks = listening_sockets("", 0)
    try:
        names = {s.getsockname()[0] for s in socks}
        assert "0.0.0.0" in names
        assert len({s.getsockname()[1] for s in socks}) == 1  # port 0: one free port for all of them
        for s in socks:
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in socks:
            s.close()


def test_images_of_a_client_that_went_away_are_not_run(tag_weights, feature_weights, collection):
    """A client that sent its images and left had them decoded and run all the same, for no one."""
    import socket

    settings = Settings(max_batch=16, max_wait_ms=2500, max_upload_bytes=LIMIT, max_files=16)
    service = load_service(str(tag_weights), str(feature_weights), device="cpu", settings=settings)
    good = images(collection)[0]
    body, ctype = multipart([(good.name, good.read_bytes())])
    with running(create_app(service)) as url:
        client = Client(url)
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = f"POST /v1/tag HTTP/1.1\r\nHost: {host}\r\nContent-Type: {ctype}\r\n"
            sock.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(0.5)  # read and queued; the batch waits max_wait_ms for company
        time.sleep(3)  # the batch's time has come and gone
        assert client.get("/healthz").json()["batches"]["images"] == 0
        reply = client.post_files("/v1/tag", [(good.name, good.read_bytes())])  # a client that waits is answered
        assert reply.status == 200 and len(reply.json()["records"]) == 1
        assert client.get("/healthz").json()["batches"]["images"] == 1


def test_head_healthz_and_a_body_that_is_not_multipart(client, collection):
    """HEAD /healthz was 405; a JSON body (or none) to an upload route was a 422 about a missing field."""
    head = client.request("HEAD", "/healthz")
    assert head.status == 200 and head.body == b""
    good = images(collection)[0]
    for route in ("/v1/tag", "/v1/features", "/v1/similar"):
        for body, headers in [(b'{"image": "x"}', {"Content-Type": "application/json"}), (good.read_bytes(), {})]:
            reply = client.request("POST", route, body, headers)
            assert reply.status == 415, (route, reply.body)
            assert "multipart/form-data" in reply.json()["error"]
    broken = client.request("POST", "/v1/tag", b"--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"})
    assert broken.status in (400, 422)  # multipart without the field: still the usual answer


def test_throttle_counts_wrong_tokens_per_address_within_a_window():
    now = [0.0]
    throttle = Throttle(limit=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.wait("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.wait("10.0.0.1") == 60 and throttle.wait("10.0.0.2") == 0  # another address is not held up
    now[0] = 59.5
    assert throttle.wait("10.0.0.1") == 0.5
    now[0] = 60.0
    assert throttle.wait("10.0.0.1") == 0  # the oldest failure has left the window


def test_guessing_the_token_is_throttled(db, tag_weights, feature_weights):
    """Nothing bounded how fast a client could guess the token, through the API or the page's /login."""
    service = load_service(str(tag_weights), str(feature_weights), db=str(db), device="cpu", settings=Settings())
    with running(create_app(service, token="s3cret")) as url:
        anonymous = Client(url)
        for i in range(20):
            guess = Client(url, f"guess{i}") if i % 2 else anonymous
            if i % 2:
                assert guess.get("/v1/search?q=").status == 401
            else:
                form = f"token=guess{i}".encode()
                reply = guess.request("POST", "/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
                assert reply.status == 401
        for _ in range(3):  # asking without a token (the page's sign-in form) is never counted
            assert anonymous.get("/").status == 401
        held = Client(url, "s3cret").get("/v1/search?q=")
        assert held.status == 429 and 0 < int(held.headers["retry-after"]) <= 61
        assert "too many wrong tokens" in held.json()["error"]
        assert anonymous.get("/healthz").status == 200  # the health check stays open
