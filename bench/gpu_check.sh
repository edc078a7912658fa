#!/usr/bin/env bash
# The GPU check, in one command on a CUDA machine: run the GPU tests, then the benchmarks, and keep every figure.
#
#   make gpu-wheels                  # here: DeepSpeed and its pure-Python needs as wheels in .whl/ (if the GPU
#                                    # machine cannot reach a package index)
#   bash bench/gpu_check.sh          # there; OUT=dir chooses where results go, WHEELS=dir the wheel folder,
#                                    # PYTHON=... the interpreter
#
# Needs torch with CUDA and triton on the GPU machine (any recent pair: the kernels are tested against torch 2.13 /
# triton 3.7 and written for older ones too). Steps, each bounded in time, each writing to $OUT even if a later one
# fails:
#   1. env.json          versions, GPU name
#   2. tests.log         tests/test_gpu.py (compiled kernels vs the interpreter, bit for bit; the optimizer's CUDA
#                        path vs the numpy reference) and tests/test_kernel_triton.py
#   3. optimizer_step.*  bench/optimizer_step.py --device cuda: one step on the 1.316 B-parameter GPT-3 XL, AdamHD
#                        vs torch AdamW(fused=True) and DeepSpeed FusedAdam, list and flat layouts
#   4. zero_throughput.* bench/zero_throughput.py on one GPU: ZeRO-2 AdamHD vs AdamW, gpt3-small, bf16
# The exit status is that of the first step that failed (0 when all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

WHEELS=${WHEELS:-.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/adamhd-gpu-site
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl; then
        export PYTHONPATH="$SITE:$PWD" PATH="$SITE/bin:$PATH"  # bin: ninja, for DeepSpeed's JIT builds
    else  # the GPU tests need no DeepSpeed: go on; the DeepSpeed candidates and the ZeRO step will say what fails
        echo "gpu_check: installing $WHEELS/*.whl failed (built for another Python?); going on without them" >&2
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export MASTER_ADDR=127.0.0.1 PYTHONUNBUFFERED=1
# DeepSpeed's JIT builds (FusedAdam) misread Hopper's "9.0a" architecture string unless the list is given.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST
fi

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, remember the first failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

"$PY" - "$OUT/env.json" <<'EOF'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
for mod in ("triton", "deepspeed", "transformers", "numpy"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"unavailable: {type(e).__name__}: {e}"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA device")
EOF
[ $? -eq 0 ] || exit 3

step tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernel_triton.py
step optimizer_step 180 "$PY" bench/optimizer_step.py --device cuda --out "$OUT/optimizer_step.json"
step zero_throughput 240 "$PY" bench/zero_throughput.py --world 1 --model gpt3-small --vocab 50304 --seq-len 1024 \
    --micro-batch 8 --steps 4 --rounds 5 --timeout 200 --out "$OUT/zero_throughput.json"
echo "gpu_check: results in $OUT (exit $status)"
exit $status
