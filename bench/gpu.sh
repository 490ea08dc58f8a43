#!/usr/bin/env bash
# The GPU measurements of issue 15, in one call under 8 minutes on a machine with CUDA:
#   1. the GPU tests (pytest -m gpu),
#   2. the golden models on CUDA in fp32 with TF32 off against the original pipeline's arrays,
#   3. model-only throughput of the full-size networks: fp32 / bf16 / fp16 at batch sizes 1 to 512,
#   4. end to end from JPEG files: nvJPEG decoding on the GPU, i2v's exact resize on the GPU, bf16 network,
#   5. the product on the same files: `i2v tag --device cuda` (CPU decoding in its workers), and its golden scores.
# Results (JSON, and the log with Markdown tables) go to $OUT when it is set, else bench/out/gpu/.
#
#   bash bench/gpu.sh              # everything
#   bash bench/gpu.sh --smoke      # the same steps on tiny sizes (where no GPU is: --device cpu is implied)
#
# i2v runs from this checkout (PYTHONPATH), nothing is installed: the GPU machines have no network. The Python
# is $I2V_PYTHON, else .venv/bin/python when its torch sees CUDA, else python3 (the GPU image's, with CUDA
# PyTorch and torchvision). Without a CUDA device the script says so and exits 0, having measured nothing.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
OUT_DIR="${OUT:-$ROOT/bench/out/gpu}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu-bench.log"
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"

has_cuda() {  # $1: a python; true when its torch imports and sees a CUDA device
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

PY="${I2V_PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in "$ROOT/.venv/bin/python" python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_cuda "$candidate"; then PY="$candidate"; break; fi
    done
fi
DEVICE=cuda
if [[ -z "$PY" ]] || ! has_cuda "$PY"; then
    if [[ -z "$SMOKE" ]]; then
        echo "bench/gpu.sh: no CUDA device visible to PyTorch here (tried ${PY:-.venv/bin/python and python3}):" \
             "nothing measured. Run it on a machine with an NVIDIA GPU, or with --smoke to check the script." >&2
        exit 0
    fi
    PY="${PY:-$ROOT/.venv/bin/python}"
    command -v "$PY" >/dev/null 2>&1 || PY=python3
    DEVICE=cpu
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

step() {  # $1: seconds allowed, $2: title, then the command
    local limit=$1 title=$2
    shift 2
    echo -e "\n## $title" | tee -a "$LOG"
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "($title: exit $rc, $((SECONDS - start)) s)" | tee -a "$LOG"
    return 0
}

: >"$LOG"
{
    echo "# i2v GPU bench, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "python: $PY; device: $DEVICE; out: $OUT_DIR"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
    "$PY" -c 'import torchvision; print("torchvision", torchvision.__version__)' 2>/dev/null || echo "torchvision: none"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} 2>&1 | tee -a "$LOG"

if [[ "$DEVICE" == cuda ]]; then
    step 60 "GPU tests (pytest -m gpu)" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_inference.py tests/test_gpudecode.py
fi
step 30 "golden models, fp32, TF32 off" "$PY" bench/gpu.py golden --device "$DEVICE" --out "$OUT_DIR" $SMOKE
step 100 "model-only throughput" "$PY" bench/gpu.py throughput --device "$DEVICE" --out "$OUT_DIR" $SMOKE
step 80 "end to end from JPEG files" "$PY" bench/gpu.py e2e --device "$DEVICE" --out "$OUT_DIR" $SMOKE
step 150 "i2v tag on the GPU" "$PY" bench/gpu.py cli --device "$DEVICE" --out "$OUT_DIR" $SMOKE
echo -e "\nbench/gpu.sh: done in $SECONDS s; results in $OUT_DIR" | tee -a "$LOG"
