"""encode1's product on the CPU, the feature network's 800 MB matrix (4096 x 50176, random values): each layout
i2v can hold it in, and ONNX Runtime's own pre-packed copy, at several batch sizes, in alternating rounds.

    .venv/bin/python bench/encode1.py [--rounds 5] [--batches 1,8,16,32]

Prints milliseconds per product (median of the rounds, and the range) and the largest difference from a float64
product relative to its largest value. Needs 3.5 GB of memory (the matrix in each layout at once).
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch

from i2v_cli.inference import ENCODE1_PANEL, PackedEncode1, fp32_mode

OUT, IN = 4096, 50176


def products(weight: torch.Tensor, bias: torch.Tensor) -> dict:
    """name -> a function of the (N, IN) input: the product as i2v's layouts and ONNX Runtime compute it."""
    linear = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    onednn = PackedEncode1(linear)
    with mock.patch("i2v_cli.inference._onednn_encode1", return_value=None):  # as on a torch without oneDNN
        panels = PackedEncode1(linear)
    out = {f"i2v {onednn.layout}": onednn, "i2v panels": panels, "torch row-major": linear}
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return out
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
        "encode1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT])],
        [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    out["onnxruntime (pre-packed)"] = lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8,16,32")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT, IN, generator=gen) * 0.01
    bias = torch.randn(OUT, generator=gen)
    funcs = products(weight, bias)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, panels of {ENCODE1_PANEL} rows")
    for n in map(int, args.batches.split(",")):
        x = torch.randn(n, IN, generator=gen)
        want = x.double() @ weight.double().T + bias.double()
        times: dict[str, list[float]] = {name: [] for name in funcs}
        errors = {}
        with torch.inference_mode(), fp32_mode("ieee"):
            for name, f in funcs.items():
                errors[name] = float((f(x).double() - want).abs().max() / want.abs().max())
            for _ in range(args.rounds):
                for name, f in funcs.items():
                    t = time.perf_counter()
                    for _ in range(3):
                        f(x)
                    times[name].append((time.perf_counter() - t) / 3 * 1000)
        print(f"\nbatch {n}:")
        for name, ms in times.items():
            spread = f"[{min(ms):.1f}-{max(ms):.1f}]"
            print(f"  {name:26s} {statistics.median(ms):7.1f} ms {spread:>14s}   rel. error {errors[name]:.1e}")


if __name__ == "__main__":
    main()
