"""``--engine ray``'s transfer of network inputs, float32 (the default, exact) against uint8, in one run.

Prints, for the same images:

1. How far uint8 moves the scores: max and mean |Δp| and the decisions at 0.5 kept, on the golden models and
   images (tests/data/golden) and on the full-size benchmark tag model and images of bench/run.py. The Ray
   records of uint8 are those of this library computation (tests/test_ray.py), so no cluster is needed here.
2. What a lossless scheme could save: the images whose network input is exactly uint8 pixels (a 224 x 224
   image: no resize), and those whose decoded pixels are no larger than the float32 input.
3. On a local two-node Ray cluster (``ray start``, 2 CPUs a node, as the tests use): object-store bytes of
   network input per image, and the throughput of an ``i2v tag --engine ray`` job, float32 and uint8
   alternating round by round (median and spread), with the full-size model and with the small golden one
   (where the network is cheap and the transfer weighs more).

    .venv/bin/pip install -e '.[ray]' && .venv/bin/python bench/ray_transfer.py      # a few minutes
    .venv/bin/python bench/ray_transfer.py --images 16 --rounds 1                    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
GOLDEN = ROOT.parent / "tests" / "data" / "golden"
sys.path.insert(0, str(ROOT))

from run import build_images, build_models  # noqa: E402  (bench/run.py: the benchmark's models and images)

from i2v_cli.config import FEATURE, INPUT_SIZE, TAG  # noqa: E402
from i2v_cli.decode import open_image  # noqa: E402
from i2v_cli.ray_engine import TRANSFERS, RayJob, normalise, round_inputs, run_job  # noqa: E402
from i2v_cli.tags import Selection, load_tag_list  # noqa: E402
from i2v_cli.transform import load_and_preprocess  # noqa: E402
from i2v_cli.weights import convert, load_model  # noqa: E402

FLOAT_BYTES = 4 * 3 * INPUT_SIZE * INPUT_SIZE
#: Ray as the tests run it; RAY_DATA_LOG_LEVEL keeps Ray Data's INFO lines and memory advice off the table.
ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOG_LEVEL": "ERROR",
}


def golden_paths() -> list[Path]:
    return [GOLDEN / line for line in (GOLDEN / "expected" / "order.txt").read_text().split()]


def deviation(weights: Path, paths: list[Path]) -> dict[str, float]:
    """Scores (tag probabilities, or sigmoid(encode1) for a feature model) of the exact input against uint8."""
    model, info = load_model(weights)
    exact_all, rounded_all = [], []
    with torch.no_grad():
        for i in range(0, len(paths), 8):
            x = torch.stack([load_and_preprocess(p) for p in paths[i : i + 8]])
            u = normalise(round_inputs(x))
            exact_all.append(model(x))
            rounded_all.append(model(u))
    exact, rounded = torch.cat(exact_all), torch.cat(rounded_all)
    if info.kind == FEATURE:
        exact, rounded = torch.sigmoid(exact), torch.sigmoid(rounded)
    diff = (exact - rounded).abs()
    return {
        "max": float(diff.max()),
        "mean": float(diff.mean()),
        "agree": float(((exact > 0.5) == (rounded > 0.5)).float().mean()),
        "n": len(paths),
    }


def lossless_share(paths: list[Path]) -> tuple[int, int]:
    """Images whose input is exactly uint8 pixels, and images whose decoded pixels fit in the float32 input."""
    exact = small = 0
    for p in paths:
        x = load_and_preprocess(p)[None]
        exact += bool(torch.equal(normalise(round_inputs(x)), x))
        img = open_image(p)
        small += img.width * img.height * 3 <= FLOAT_BYTES
    return exact, small


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(root: Path) -> tuple[str, list[subprocess.Popen]]:
    """A head and a worker node on this machine, 2 CPUs each (as tests/test_ray.py starts them)."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, **ENV}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=2", "--object-store-memory=200000000", "--disable-usage-stats"]
    nodes = []
    for args, n in (
        (["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root}/h"], 1),
        ([f"--address={address}", f"--temp-dir={root}/w"], 2),
    ):
        log = open(root / f"node{n}.log", "wb")  # noqa: SIM115  (kept open for the node's life)
        nodes.append(subprocess.Popen([ray, "start", *args, *common], env=env, stdout=log, stderr=log,
                                      start_new_session=True))  # fmt: skip
        probe = (
            f"import ray; ray.init(address={address!r}, logging_level='ERROR', log_to_driver=False); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))"
        )
        deadline = time.monotonic() + 120
        while True:
            out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=90)
            if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= n:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in nodes):
                stop_cluster(nodes)
                raise SystemExit(f"the Ray cluster did not reach {n} nodes; see {root}")
            time.sleep(1)
    return address, nodes


def stop_cluster(nodes: list[subprocess.Popen]) -> None:
    for proc in reversed(nodes):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except ProcessLookupError:
            continue
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def ray_round(address: str, weights: Path, inputs: list[str], transfer: str, out: Path, shard: int) -> tuple:
    """One ``i2v tag --engine ray`` job; (images/s, bytes per image, seconds)."""
    job = RayJob(kind=TAG, weights=str(weights), out=str(out), fmt="jsonl", tags=load_tag_list(None),
                 selection=Selection.make(0.5), shard_size=shard, address=address, progress=False,
                 transfer=transfer)  # fmt: skip
    model, info = load_model(weights)
    del model
    *_, summary = run_job(job, inputs, {"source": info.source, "sha256": info.sha256})  # the last is final
    assert summary.images == len(inputs) and not summary.errors
    return summary.throughput, summary.bytes_per_image, summary.seconds


def cpu_costs(paths: list[Path]) -> dict[str, float]:
    """Milliseconds per image of the rounding (decoding task) and of the normalisation (actor), on one thread as
    both run there."""
    torch.set_num_threads(1)
    x = torch.stack([load_and_preprocess(p) for p in paths[:16]]).repeat(4, 1, 1, 1)
    t0 = time.perf_counter()
    u = round_inputs(x)
    t1 = time.perf_counter()
    normalise(u)
    t2 = time.perf_counter()
    return {"round": 1000 * (t1 - t0) / len(x), "normalise": 1000 * (t2 - t1) / len(x)}


def cross_node(address: str, shard: int = 32, shards: int = 4, rounds: int = 7) -> dict[str, float]:
    """Milliseconds per image to move a shard's inputs from the head node's object store to a task on the worker
    node (a copy between the two nodes' stores, as between machines), float32 against uint8: the median over
    rounds in alternating order, less the same tasks' time with an empty argument."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        here = ray.get_runtime_context().get_node_id()
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != here)

        @ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False))
        def size(data: bytes) -> int:
            return len(data)

        ray.get(size.remote(b"warm-up"))
        per_image = {"empty": 0, "float32": FLOAT_BYTES, "uint8": FLOAT_BYTES // 4}
        times: dict[str, list[float]] = {k: [] for k in per_image}
        for r in range(rounds):
            for kind in list(per_image)[:: 1 if r % 2 == 0 else -1]:
                refs = [ray.put(os.urandom(per_image[kind] * shard)) for _ in range(shards)]  # fresh objects
                t0 = time.perf_counter()
                assert sum(ray.get([size.remote(ref) for ref in refs])) == per_image[kind] * shard * shards
                times[kind].append(1000 * (time.perf_counter() - t0) / (shard * shards))
                del refs
        base = statistics.median(times["empty"])
        return {t: statistics.median(times[t]) - base for t in TRANSFERS}
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="benchmark images (bench/run.py's folder)")
    parser.add_argument("--rounds", type=int, default=3, help="Ray rounds per transfer and model")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--no-ray", action="store_true", help="only the score deviation and the lossless share")
    args = parser.parse_args()
    os.environ.update(ENV)

    tmp = Path(tempfile.mkdtemp(prefix="i2vrt", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    try:
        golden = {name: tmp / f"{name}.safetensors" for name in ("tag_v2", "feature_v1")}
        for name, path in golden.items():
            convert(GOLDEN / "models" / f"{name}.caffemodel", path)
        bench = build_models()
        folder = build_images(args.images)
        bench_paths = sorted(folder.iterdir())

        print(f"i2v ray transfer bench: torch {torch.__version__}, {os.cpu_count()} CPUs\n")
        print("1. uint8 against float32 (exact): scores")
        print(f"{'model, images':<46} {'max |Δp|':>9} {'mean |Δp|':>10} {'kept at 0.5':>12}")
        rows = [
            ("golden tag_v2, golden images", golden["tag_v2"], golden_paths()),
            ("golden feature_v1 (sigmoid encode1), golden", golden["feature_v1"], golden_paths()),
            (f"full-size tag (bench), {len(bench_paths)} bench images", bench[TAG], bench_paths),
        ]
        for label, weights, paths in rows:
            d = deviation(weights, paths)
            print(f"{label:<46} {d['max']:>9.5f} {d['mean']:>10.2e} {100 * d['agree']:>11.3f}%")

        print("\n2. Lossless candidates (images out of all)")
        for label, paths in (("golden", golden_paths()), ("bench", bench_paths)):
            exact, small = lossless_share(paths)
            print(f"{label}: input exactly uint8 (no resize) {exact}/{len(paths)}; "
                  f"decoded pixels <= float32 input {small}/{len(paths)}")  # fmt: skip

        if args.no_ray:
            return
        print(f"\n3. Ray: {len(bench_paths)} bench images, shards of {args.shard_size}, local 2-node cluster")
        address, nodes = start_cluster(tmp)
        try:
            cpu = cpu_costs(bench_paths)
            moved = cross_node(address)
            print(f"per image: rounding {cpu['round']:.2f} ms (decoding task), normalising {cpu['normalise']:.2f} ms "
                  f"(actor); moving a shard between the two nodes' object stores: float32 {moved['float32']:.2f} ms, "
                  f"uint8 {moved['uint8']:.2f} ms")  # fmt: skip
            inputs = [str(p) for p in bench_paths]
            for label, weights in (("full-size tag", bench[TAG]), ("golden tag_v2", golden["tag_v2"])):
                rates: dict[str, list[float]] = {t: [] for t in TRANSFERS}
                sent: dict[str, float] = {}
                for r in range(args.rounds):
                    order = TRANSFERS if r % 2 == 0 else TRANSFERS[::-1]
                    for transfer in order:
                        out = tmp / f"out-{label[:4]}-{r}-{transfer}"
                        rate, per_image, _ = ray_round(address, weights, inputs, transfer, out, args.shard_size)
                        rates[transfer].append(rate)
                        sent[transfer] = per_image
                        shutil.rmtree(out)
                ratios = [u / f for f, u in zip(rates["float32"], rates["uint8"], strict=True)]
                for t in TRANSFERS:
                    spread = f"[{min(rates[t]):.1f}-{max(rates[t]):.1f}]"
                    print(f"{label:<14} {t:<8} {sent[t] / 1e3:8.1f} KB/image  "
                          f"{statistics.median(rates[t]):6.1f} img/s {spread}")  # fmt: skip
                span = f"[{min(ratios):.2f}-{max(ratios):.2f}]"
                print(f"{label:<14} uint8/float32: throughput {statistics.median(ratios):.2f} {span}, "
                      f"bytes {sent['uint8'] / sent['float32']:.3f}")  # fmt: skip
        finally:
            stop_cluster(nodes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
