"""Where int8 loses the feature network's bits, and which activation recipe wins them back: a simulation.

Fake-quantised in PyTorch on bench/run.py's full-size feature network (random weights, scaled head): the
GPTQ-rounded weights of i2v's recipe, and uint8 activations at the points ONNX Runtime's QDQ graph quantises
(the input and every ReLU output), each with a scale from the calibration set by one of several rules. Scores
are the share of encode1's signs unchanged against fp32 on the benchmark's first 64 images (as bench/run.py).

    .venv/bin/python bench/int8_probe.py --only ranges,sensitivity,symmetric,bias,last,equalize

Each GPTQ of the full network takes minutes on 2 cores (cached in bench/out/probe); each evaluation about 20 s.
Measured (built-in calibration set): weights alone 99.71%; min-max 98.81%; percentiles 99.999/99.99/99.9
98.81/98.08/94.80%; least-squares ranges 98.82%; each point quantised alone costs 0.05-0.22%, so keeping one or
two in fp32 gains about 0.1%; int8 symmetric 97.73%; bias correction of encode1 98.80%; the last ReLU alone
equalised 98.82%; every ReLU equalised, max / max_i 99.03%, its square root 99.16% (what i2v does).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

from i2v_cli import quantize
from i2v_cli.transform import load_and_preprocess

PROBE = bench.OUT / "probe"
SAMPLES = 1 << 16  # activation values kept per batch and quantisation point


def _points(net) -> list[int]:
    """Indices in net.features after which an activation is quantised (every ReLU); -1 stands for the input."""
    return [-1, *[i for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]]


def gptq_weights(net, inputs, kind: str) -> list[torch.Tensor]:
    """The dequantised GPTQ weights of conv1_1 ... conv6_3 (cached: GPTQ of the full network takes minutes)."""
    path = PROBE / f"gptq-{kind}.pt"
    if path.is_file():
        return torch.load(path)
    stats = quantize.calibration_statistics(net, inputs)
    out = []
    for conv, h in zip(quantize._int8_convolutions(net), stats.hessians, strict=True):
        q, scale = quantize.gptq(conv.weight, h)
        out.append(q.float() * scale.view(-1, 1, 1, 1))
    PROBE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def samples(net, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per quantisation point: a random sample of its fp32 activations over ``inputs``, plus the exact maximum."""
    gen = torch.Generator().manual_seed(0)
    out: dict[int, list[torch.Tensor]] = {p: [] for p in _points(net)}
    top: dict[int, float] = {p: -1e30 for p in out}
    low: dict[int, float] = {p: 1e30 for p in out}

    def keep(p, x):
        flat = x.reshape(-1)
        out[p].append(flat[torch.randint(0, flat.numel(), (SAMPLES,), generator=gen)])
        top[p], low[p] = max(top[p], float(flat.max())), min(low[p], float(flat.min()))

    with torch.inference_mode():
        for s in range(0, len(inputs), 8):
            x = inputs[s : s + 8]
            keep(-1, x)
            for i, m in enumerate(net.features):
                x = m(x)
                if i in out:
                    keep(i, x)
    return {p: (torch.cat(v), low[p], top[p]) for p, v in out.items()}


def fq(x: torch.Tensor, lo: float, hi: float, levels: int = 255) -> torch.Tensor:
    """Fake-quantise to ``levels`` + 1 steps over [lo, hi] (lo <= 0 <= hi; zero exact, as uint8 with a zero point)."""
    lo, hi = min(lo, 0.0), max(hi, 1e-8)
    scale = (hi - lo) / levels
    zp = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zp, 0, levels) - zp) * scale


def ranges(smp, rule: str) -> dict[int, tuple[float, float]]:
    """The [lo, hi] of every quantisation point by ``rule``: minmax, pNN.NNN (percentile of |x| for hi), mse."""
    out = {}
    for p, (v, lo, hi) in smp.items():
        if rule == "minmax":
            out[p] = (lo, hi)
        elif rule.startswith("p"):
            q = float(rule[1:]) / 100
            out[p] = (lo if p == -1 else 0.0, float(torch.quantile(v[:1_000_000], q)))
        elif rule == "mse":
            best = None
            for r in np.linspace(0.15, 1.0, 69):
                h = hi * r
                lo_p = lo if p == -1 else 0.0
                err = float((fq(v, lo_p, h) - v).pow(2).mean())
                if best is None or err < best[0]:
                    best = (err, lo_p, h)
            out[p] = best[1:]
        else:
            raise SystemExit(rule)
    return out


def forward(net, wq, x, rng: dict[int, tuple[float, float] | None], levels: dict[int, int] | None = None, bias=None):
    """encode1 of the fake-quantised network: conv weights ``wq``, activations fake-quantised at ``rng``'s points."""
    levels = levels or {}
    convs = iter(wq)
    biases = iter(bias) if bias is not None else None
    if rng.get(-1):
        x = fq(x, *rng[-1], levels.get(-1, 255))
    for i, m in enumerate(net.features):
        if isinstance(m, nn.Conv2d):
            b = next(biases) if biases is not None else m.bias
            x = F.conv2d(x, next(convs), b, padding=1)
        else:
            x = m(x)
        if rng.get(i):
            x = fq(x, *rng[i], levels.get(i, 255))
    return net.forward_head(x)


def evaluate(net, wq, x, ref, rng, **kw) -> tuple[float, float]:
    """Share of encode1's signs kept and max |diff| relative to the largest |feature|."""
    with torch.inference_mode():
        y = torch.cat([forward(net, wq, x[s : s + 8], rng, **kw) for s in range(0, len(x), 8)])
    return float(((y > 0) == (ref > 0)).float().mean()), float((y - ref).abs().max() / ref.abs().max())


def channel_max(net, inputs: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per ReLU output: each channel's largest value over ``inputs`` (fp32)."""
    out: dict[int, torch.Tensor] = {}
    with torch.inference_mode():
        for s in range(0, len(inputs), 8):
            x = inputs[s : s + 8]
            for i, m in enumerate(net.features):
                x = m(x)
                if isinstance(m, nn.ReLU):
                    top = x.amax(dim=(0, 2, 3))
                    out[i] = top if i not in out else torch.maximum(out[i], top)
    return out


def equalize(net, cmax: dict[int, torch.Tensor], alpha: float):
    """A copy of ``net`` whose ReLU outputs are rescaled channel by channel, a_i * s_i with s_i = (max / max_i)^alpha,
    the next convolution's input columns divided by s_i (ReLU and max-pooling commute with a positive scale).
    Returns (copy, 1 / s of the last ReLU: what encode1's input must be multiplied by)."""
    import copy

    eq = copy.deepcopy(net)
    convs = [i for i, m in enumerate(eq.features) if isinstance(m, nn.Conv2d)]
    last = None
    with torch.no_grad():
        for k, ci in enumerate(convs):
            relu = ci + 1
            r = cmax[relu].clamp_min(1e-6)
            s = (r.max() / r) ** alpha
            conv = eq.features[ci]
            conv.weight.mul_(s.view(-1, 1, 1, 1))
            conv.bias.mul_(s)
            if k + 1 < len(convs):
                eq.features[convs[k + 1]].weight.div_(s.view(1, -1, 1, 1))
            last = 1 / s
    return eq, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", default="feature")
    parser.add_argument("--eval-images", type=int, default=64)
    parser.add_argument("--alphas", default="1,0.5", help="equalisation exponents to try")
    parser.add_argument("--only", default="", help="comma-separated experiment groups (default: all)")
    args = parser.parse_args()
    groups = set(args.only.split(",")) if args.only else None

    def want(g):
        return groups is None or g in groups

    torch.manual_seed(0)
    bench.build_models()
    folder = bench.build_images(160)
    net = bench._load(args.kind).eval()
    files = sorted(folder.iterdir())
    x = torch.stack([load_and_preprocess(f) for f in files[: args.eval_images]])
    inputs = quantize.network_inputs(quantize.synthetic_images())
    wq = gptq_weights(net, inputs, args.kind)
    with torch.inference_mode():
        ref = torch.cat([net(x[s : s + 8]) for s in range(0, len(x), 8)])
    smp = samples(net, inputs)
    points = _points(net)
    results = {}

    def record(name, value):
        results[name] = value
        print(f"{name:55} {value[0]:.4%}  {value[1]:.4f}", flush=True)

    base = ranges(smp, "minmax")
    record("weights only (fp32 activations)", evaluate(net, wq, x, ref, {}))
    record("all points, minmax", evaluate(net, wq, x, ref, base))
    if want("ranges"):
        for rule in ["p99.999", "p99.99", "p99.9", "mse"]:
            record(f"all points, {rule}", evaluate(net, wq, x, ref, ranges(smp, rule)))
    names = ["input", *[n for n in net.features._modules if n.startswith("relu")]]
    if want("sensitivity"):  # one point quantised alone, and every point but one
        for p, n in zip(points, names, strict=True):
            record(f"only {n} quantised (minmax)", evaluate(net, wq, x, ref, {p: base[p]}))
        for p, n in zip(points, names, strict=True):
            record(f"all but {n} (minmax)", evaluate(net, wq, x, ref, {q: base[q] for q in points if q != p}))
    if want("fp32"):
        for keep in (["input", "relu3_1"], ["input", "relu6_3"], ["input", "relu3_1", "relu6_3"]):
            drop = {points[names.index(n)] for n in keep}
            record(
                f"all but {'+'.join(keep)}", evaluate(net, wq, x, ref, {q: base[q] for q in points if q not in drop})
            )
    if want("symmetric"):  # int8 after ReLU: 127 steps over [0, max]
        record("minmax, int8 symmetric (127 steps)", evaluate(net, wq, x, ref, base, levels={p: 127 for p in points}))
    if want("bias"):  # encode1's mean shift over the calibration set, subtracted from its bias
        with torch.inference_mode():
            cal_ref = torch.cat([net(inputs[s : s + 8]) for s in range(0, len(inputs), 8)])
            cal_q = torch.cat([forward(net, wq, inputs[s : s + 8], base) for s in range(0, len(inputs), 8)])
        shift = (cal_q - cal_ref).mean(0)
        print(f"encode1 shift: mean |shift| {float(shift.abs().mean()):.4f}, ref std {float(cal_ref.std()):.4f}")
        saved = net.encode1.bias.detach().clone()
        with torch.no_grad():
            net.encode1.bias.sub_(shift)
        record("minmax + encode1 bias correction", evaluate(net, wq, x, ref, base))
        with torch.no_grad():
            net.encode1.bias.copy_(saved)
    if want("last"):  # equalise the last ReLU alone: free, the head (fp32) takes the factors back
        cmax = channel_max(net, inputs)
        last_relu = max(cmax)
        for alpha in (1.0, 0.5):
            r = cmax[last_relu].clamp_min(1e-6)
            s = (r.max() / r) ** alpha
            wq2 = [*wq[:-1], wq[-1] * s.view(-1, 1, 1, 1)]
            convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
            biases = [*(c.bias for c in convs[:-1]), convs[-1].bias * s]
            head = net.forward_head
            net.forward_head = lambda y, head=head, s=s: head(y / s.view(1, -1, 1, 1))
            rng = dict(base)
            rng[last_relu] = (0.0, float((r * s).max()))
            record(f"last ReLU equalized a={alpha}", evaluate(net, wq2, x, ref, rng, bias=biases))
            net.forward_head = head
    if want("equalize"):
        cmax = channel_max(net, inputs)
        for p in sorted(cmax):
            r = cmax[p]
            print(f"  relu at {p}: channel max ratio max/median {float(r.max() / r.median()):.2f}")
        for alpha in [float(a) for a in args.alphas.split(",")]:
            eq, last = equalize(net, cmax, alpha)
            weq = gptq_weights(eq, inputs, f"{args.kind}-eq{alpha}")
            head = eq.forward_head
            eq.forward_head = lambda y, head=head, last=last: head(y * last.view(1, -1, 1, 1))
            eqr = ranges(samples(eq, inputs), "minmax")
            record(f"equalized a={alpha}: weights only", evaluate(eq, weq, x, ref, {}))
            record(f"equalized a={alpha}: minmax", evaluate(eq, weq, x, ref, eqr))
            del eq
    (PROBE / f"sim-{args.kind}-{args.only or 'all'}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
