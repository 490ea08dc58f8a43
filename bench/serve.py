"""Load test of ``i2v serve`` on loopback, bounded in time, against ``i2v tag`` on the same images in the same run.

Uses the full-size random-weight models and mixed-size images of bench/run.py (speed does not depend on the
weights' values). Measures:

1. ``i2v tag`` on the N images and on 1 image (both in fresh processes, as a user runs them, after a warm-up run
   that makes the ONNX export); its images/s is (N - 1) / (t_N - t_1), so model loading and start-up cancel out
   and the steady rate remains; measured before and after the server, to show how much the machine drifted;
2. ``i2v serve`` (one process, models loaded once, --max-batch 16) under C concurrent clients (1, 4, 16, 64),
   each posting one image per request to /v1/tag over a kept-alive connection for --seconds: requests/s,
   images/s, p50/p99 latency, errors (must be 0);
3. the ratio of images/s at 16 clients to ``i2v tag``'s (the issue's target: at least 0.8).

The clients are Python threads on the same machine, so they take CPU from the server: the ratio is a lower bound.

    .venv/bin/pip install -e '.[serve,onnx]' && .venv/bin/python bench/serve.py       # about 3-4 minutes
    .venv/bin/python bench/serve.py --images 16 --seconds 5 --clients 1 16            # a quicker run
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import OUT, build_images, build_models  # bench/run.py: the same models and images


def cli_rate(i2v: list[str], images: list[Path], weights: Path, batch: int) -> tuple[float, float, float]:
    """``i2v tag`` images/s on the images, start-up cancelled out: (rate, seconds for N, seconds for 1)."""

    def timed(paths: list[Path]) -> float:
        start = time.perf_counter()
        subprocess.run([*i2v, "tag", *map(str, paths), "-w", str(weights), "-b", str(batch), "-f", "jsonl",
                        "-o", os.devnull, "--no-progress"], check=True, stderr=subprocess.DEVNULL)  # fmt: skip
        return time.perf_counter() - start

    timed(images[:1])  # warm-up: the first run of a set of weights makes its ONNX export (cached after)
    one = timed(images[:1])
    many = timed(images)
    return (len(images) - 1) / max(many - one, 1e-9), many, one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body_of(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def load(port: int, bodies: list[tuple[bytes, str]], clients: int, seconds: float) -> dict:
    """``clients`` threads posting one image per request for ``seconds``; latencies and errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        i = k
        mine, bad = [], []
        while time.monotonic() < stop:
            body, ctype = bodies[i % len(bodies)]
            i += clients
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/tag", body, {"Content-Type": ctype})
                resp = conn.getresponse()
                data = resp.read()
                if resp.status != 200 or b'"error"' in data:
                    bad.append(f"{resp.status}: {data[:200]!r}")
            except OSError as exc:
                bad.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            mine.append(time.perf_counter() - start)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 2),
        "images_per_s": round(len(lat) / wall, 2),  # one image per request
        "p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1) if lat else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=32, help="Images (mixed sizes, from bench/run.py).")
    parser.add_argument("--seconds", type=float, default=20.0, help="Duration of each client count.")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--decode-threads", type=int, default=None, help="The server's (default: its own).")
    args = parser.parse_args()

    models = build_models()
    images = sorted(build_images(args.images).iterdir())
    i2v = [sys.executable, "-m", "i2v_cli"]
    before, many, one = cli_rate(i2v, images, models["tag"], args.max_batch)
    print(f"i2v tag: {len(images)} images in {many:.1f} s, 1 in {one:.1f} s: {before:.2f} img/s (start-up cancelled)")

    port = free_port()
    server = subprocess.Popen(
        [*i2v, "serve", "--port", str(port), "--tag-weights", str(models["tag"]), "--feature-weights",
         str(models["feature"]), "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
         "--timeout", "600", *(["--decode-threads", str(args.decode_threads)] if args.decode_threads else [])],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    rows = []
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    said = server.stderr.read() if server.stderr else ""
                    raise SystemExit(f"the server did not start: {said}") from None
                time.sleep(0.2)
        bodies = [body_of(p) for p in images]
        load(port, bodies, 4, min(5.0, args.seconds))  # warm-up: first batches, allocator, ONNX sessions
        for clients in args.clients:
            row = load(port, bodies, clients, args.seconds)
            row["ratio_to_cli"] = round(row["images_per_s"] / before, 3)
            rows.append(row)
            print(f"{clients:3d} clients: {row['requests_per_s']:7.2f} req/s {row['images_per_s']:7.2f} img/s  "
                  f"p50 {row['p50_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}  "
                  f"ratio to i2v tag (before) {row['ratio_to_cli']}")  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/healthz")
        batches = json.loads(conn.getresponse().read())["batches"]
    finally:
        server.terminate()
        server.wait(60)
    after, many, one = cli_rate(i2v, images, models["tag"], args.max_batch)
    print(f"i2v tag again: {len(images)} images in {many:.1f} s, 1 in {one:.1f} s: {after:.2f} img/s")
    rate = (before + after) / 2
    at16 = next((r for r in rows if r["clients"] == 16), None)
    ratio = round(at16["images_per_s"] / rate, 3) if at16 else None
    summary = {"cli_images_per_s": [round(before, 2), round(after, 2)], "rows": rows, "batches": batches,
               "ratio_at_16": ratio, "cpus": os.cpu_count()}  # fmt: skip
    print(
        f"batches run: {batches}; images/s at 16 clients / i2v tag (mean of the runs before and after): {ratio} "
        "(target >= 0.8)"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "serve.json").write_text(json.dumps(summary, indent=2))
    if any(r["errors"] for r in rows):
        raise SystemExit("errors under load: " + "; ".join(r["first_error"] for r in rows if r["first_error"]))


if __name__ == "__main__":
    main()
