#!/usr/bin/env bash
# Everything that needs a GPU, in one command (about 8 minutes on one H100):
#   1. every GPU-marked test: per-document varlen attention against the CPU reference and
#      training on it (tests/test_gpu.py), the vLLM engine (batched greedy sampling, log-probs
#      against the trainer's, hotload of base, delta and LoRA snapshots; needs `vllm`), FSDP2
#      with NCCL (needs 2 GPUs);
#   2. the SFT throughput benchmark at Qwen3-0.6B's shape (random init, built offline) on the
#      GPU: ours with the default settings against TRL at its best GPU setting (padding-free,
#      flash attention where installed, else SDPA) and the minimal packed loop, printing real
#      tokens/s, MFU and peak GPU memory.
# Without a GPU it says what it skipped and exits 0.
#
#   bash scripts/gpu_check.sh                  # from the repository root
#   PYTHON=python3 bash scripts/gpu_check.sh   # another interpreter than .venv/bin/python
#   GPU_CHECK_OUT=/tmp/out bash scripts/gpu_check.sh   # also keep the logs there
# On a machine that cannot reach a package index, run scripts/gpu_wheels.sh first where pip
# can, and bring .whl/ along: this script installs it when the interpreter lacks the packages.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# The files holding GPU-marked tests (collecting the whole suite would import test-only
# packages a GPU image may not have).
GPU_TESTS="tests/test_gpu.py tests/test_deployments.py tests/test_distributed.py"
# On a machine without a package index: the wheels scripts/gpu_wheels.sh fetched, installed
# beside the image's own packages (first on PYTHONPATH; nothing of the image is changed), when
# this interpreter lacks them.
if [ -d .whl ] && ! "$PY" -c "import tinker, hydra, datasets" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/homefire-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/homefire-site${PYTHONPATH:+:$PYTHONPATH}
fi

card=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null)
if [ -z "$card" ]; then
    echo "gpu_check: no CUDA GPU here. Skipped:"
    echo "  - the GPU tests (their reasons below),"
    echo "  - the throughput benchmark at the qwen3-0.6b shape on the GPU (tokens/s, MFU, peak GPU memory)."
    "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider $GPU_TESTS 2>&1 | grep -E "SKIPPED|passed|skipped|deselected"
    exit 0
fi
echo "gpu_check on: $card ($(nvidia-smi --query-gpu=memory.total,driver_version --format=csv,noheader 2>/dev/null))"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

status=0
echo "== 1/2 GPU tests"
timeout 300 "$PY" -m pytest -m gpu -q -rs -x -p no:cacheprovider $GPU_TESTS 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== 2/2 SFT throughput, qwen3-0.6b shape, on the GPU"
timeout 240 "$PY" benchmarks/sft_throughput.py --device cuda --model qwen3-0.6b \
    --only ours trl-best ceiling --steps 10 --warmup 3 --batch-size 8 --max-len 1024 \
    2>&1 | tee "$OUT/gpu_throughput.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: logs in $OUT; exit $status"
exit $status
