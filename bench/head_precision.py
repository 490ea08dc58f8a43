"""What the tag head's precision does to scores under bf16, measured on the CPU by emulating TF32.

On an H100 the tag network in bf16 ran 8,594 img/s and the feature network (same trunk, a smaller head) 11,019:
the head (conv6_4, run in IEEE fp32 in every precision) is about a quarter of the time there. TF32 would make it
several times faster. TF32 is NVIDIA hardware, but its arithmetic is fp32 with both operands rounded to a 10-bit
mantissa: emulated here by that rounding, on the golden tag model (which reacts to fine texture: a harsh judge).

    python bench/head_precision.py

Prints, for the bf16 trunk (autocast on the CPU) followed by each head, the share of decisions at 0.5 equal to
the fp32 model's and the largest |Δp|.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOLDEN = ROOT / "tests" / "data" / "golden"


def tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` (float32) rounded to TF32's 10-bit mantissa, to nearest even, as the tensor cores read it."""
    bits = t.contiguous().view(torch.int32)
    bits = (bits + 0x0FFF + ((bits >> 13) & 1)) & ~0x1FFF
    return bits.view(torch.float32)


def main() -> None:
    from i2v_cli.weights import load_model

    model, _ = load_model(GOLDEN / "models" / "tag_v2.caffemodel")
    x = torch.from_numpy(np.load(GOLDEN / "expected" / "inputs.npz")["inputs"])
    conv = model.conv6_4
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = model.forward_features(x)
        h = h.float()
        heads = {
            "IEEE fp32 (today's)": model.forward_head(h),
            "TF32 (emulated)": torch.nn.functional.conv2d(
                tf32(h), tf32(conv.weight), conv.bias, padding=conv.padding
            ).mean(dim=(2, 3)),
        }
        with torch.autocast("cpu", dtype=torch.bfloat16):
            heads["bf16"] = model.forward_head(h).float()
    print(f"golden tag model, {x.shape[0]} images x {ref.shape[1]} scores; bf16 trunk, then the head in:")
    for name, logits in heads.items():
        p = torch.sigmoid(logits)
        agree = float(((p >= 0.5) == (ref >= 0.5)).float().mean())
        print(f"  {name:20s} {agree:.3%} of decisions as fp32, max |dp| {float((p - ref).abs().max()):.3f}")


if __name__ == "__main__":
    main()
