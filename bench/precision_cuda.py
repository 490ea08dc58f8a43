"""What each ``--precision`` costs and gives on a CUDA GPU: distance to the golden outputs, and speed.

Part 1, fidelity: the golden synthetic models (tests/data/golden) on the original pipeline's preprocessed batch,
run three ways: plain eager fp32 under torch's own defaults (cuDNN convolutions may use TF32), i2v's fp32
(IEEE, TF32 off around the call) and i2v's tf32; the largest absolute difference to the expected outputs.
Part 2, speed: a full-size tag network (the release's widths, random weights) at batch 64, img/s per precision
(median of 5 rounds of 10 batches after warm-up; the GPU alone, inputs already on it).

    python bench/precision_cuda.py          # needs a CUDA device; about a minute
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from i2v_cli.config import INPUT_SIZE, RELEASE_WIDTHS, TAG
from i2v_cli.inference import prepare_for_inference
from i2v_cli.model import Architecture, Illust2VecNet
from i2v_cli.weights import load_model

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden"


def fidelity() -> None:
    x = torch.from_numpy(np.load(GOLDEN / "expected" / "inputs.npz")["inputs"]).cuda()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__}")
    print("max |output - golden|   eager default | i2v fp32 | i2v tf32")
    for name in ("tag_v1", "tag_v2", "feature_v1"):
        model, _ = load_model(GOLDEN / "models" / f"{name}.caffemodel", device="cuda")
        expected = np.load(GOLDEN / "expected" / f"{name}.npy")
        with torch.inference_mode():
            eager = model(x).float().cpu().numpy()
        row = [np.abs(eager - expected).max()]
        for precision in ("fp32", "tf32"):
            net = prepare_for_inference(load_model(GOLDEN / "models" / f"{name}.caffemodel", device="cuda")[0],
                                        precision=precision)  # fmt: skip
            with torch.inference_mode():
                row.append(np.abs(net(x).float().cpu().numpy() - expected).max())
        print(f"{name:22s}  " + " | ".join(f"{v:.2e}" for v in row))


def speed() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 3, INPUT_SIZE, INPUT_SIZE, device="cuda") * 50
    print("full-size tag network, batch 64: img/s")
    for precision in ("fp32", "tf32", "bf16", "fp16"):
        model = Illust2VecNet(Architecture(TAG, RELEASE_WIDTHS)).cuda().eval()
        net = prepare_for_inference(model, precision=precision)
        rates = []
        with torch.inference_mode():
            for _ in range(3):
                net(x)
            for _ in range(5):
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    net(x)
                torch.cuda.synchronize()
                rates.append(640 / (time.perf_counter() - start))
        print(f"  {precision}: {statistics.median(rates):8.0f}  ({net.describe()})")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    fidelity()
    speed()
