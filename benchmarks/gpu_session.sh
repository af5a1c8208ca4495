#!/usr/bin/env bash
# One prepared GPU check, sized for one device call (~8 minutes): the CUDA tests, the kernel benchmark
# and the decode benchmark on random-weight SmolLM2-135M shapes. Run it from the repository root on a
# machine with an NVIDIA GPU; results go under $OUT (default ./gpu_out), at most 5 files:
#   session.log                 every step's output, with the versions and nvidia-smi
#   kernels-*.json / .csv       benchmarks/kernels.py --quick (mlp-in, mlp, quant, lowbit, attn)
#   decode_cuda_*.json / .csv   benchmarks/decode.py --device cuda --quick (CUDA graphs, dense and actions)
#
# The device machines here have PyTorch, Triton and transformers but no torchao (the weight-quant
# copies are made with it). Carry its wheel: once, in the repo root on this machine,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
# (the device image's transformers was 5.17 in 2026-11, pyproject pins 5.23: if the environment step
# shows an import error from transformers, add transformers==5.23.0 to the same download, 13 MB)
# then run `bash benchmarks/gpu_session.sh` with `.whl` carried. Wheels under .whl are installed into
# /tmp/site first. Each step has its own time limit, so one hung step cannot take the others with it.
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/session.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step SECONDS NAME COMMAND...: run with a time limit, log it, never stop the session
    local limit=$1 name=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$LOG"
}

if ls .whl/*.whl >/dev/null 2>&1; then
    step 60 wheels "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
step 30 environment bash -c "nvidia-smi; $PY -c 'import torch, triton, transformers; print(torch.__version__, \
torch.version.cuda, torch.cuda.get_device_name(0), triton.__version__, transformers.__version__)'; \
$PY -c 'import torchao; print(\"torchao\", torchao.__version__)'"
step 150 cuda-tests "$PY" -m pytest -q -p no:cacheprovider -rs tests/runtime/kernels/test_cuda_kernels.py
step 150 kernels "$PY" benchmarks/kernels.py --quick --models smollm2-135m,llama-3.2-1b --out "$OUT"
step 150 decode "$PY" benchmarks/decode.py --device cuda --quick --batch 1,16 --contexts 512,16384 \
    --out "$OUT" --tag cuda_quick
echo "done $(date -u +%H:%M:%S)" | tee -a "$LOG"
