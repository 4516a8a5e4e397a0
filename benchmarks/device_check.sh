#!/usr/bin/env bash
# The GPU checks, as one run on a lent GPU machine (docs/PERFORMANCE.md, "GPU checks"):
#   1. the GPU tests (`pytest -m gpu`: the compiled Triton kernels, the CUDA codec decoder, blend on CUDA);
#   2. the gather/scatter kernels' speed against a device copy (`benchmarks.kernels_bench --device cuda`);
#   3. the CUDA codec decoder's speed and bit-exactness (`benchmarks.codec_gpu_bench`).
# From the repository root: `bash benchmarks/device_check.sh [OUT]`. Logs and JSON go to OUT (default $OUT, else
# device-out/). Packages such a machine lacks (it reaches no package index) travel as wheels in .whl/, which
# `make device-wheels` fills here. Each step has its own time limit; the exit status is 1 if any step failed.
set -uo pipefail
out=${1:-${OUT:-device-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvstore-site \
        .whl/*.whl || { echo "installing the wheels in .whl/ failed"; exit 1; }
    export PYTHONPATH="$PWD:/tmp/kvstore-site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output to OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name ($*)"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
step tests 240 python3 -m pytest -m gpu -p no:cacheprovider
step kernels 180 python3 -m benchmarks.kernels_bench --quick --device cuda --json "$out/kernels.json"
step codec 180 python3 -m benchmarks.codec_gpu_bench --json "$out/codec_gpu.json"
exit $failed
