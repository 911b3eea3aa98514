#!/bin/bash
# The GPU figures of benchmarks/README.md, in one prepared run on a lent GPU machine (no network
# there: the pure-Python gin-config wheel travels in .whl/, see /work/.library/device/README.md).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())' | tee -a "$OUT/gpu.txt"
run() { echo "+ $*" | tee -a "$OUT/log.txt"; timeout 120 python3 "$@" 2>&1 | grep -v '^W0000\|^I0000\|^WARNING: All log' | tee -a "$OUT/log.txt"; }
run benchmarks/stage_training.py --config anchor --batch 4 --length 1024 --steps 10 --peak_tflops 989
run benchmarks/stage_training.py --config paper --batch 16 --length 1024 --steps 5 --peak_tflops 989
run benchmarks/stage_training.py --config paper --batch 16 --length 1024 --steps 5 --remat none --scan false --peak_tflops 989
run benchmarks/sampling.py --config paper --lengths 500 2000 --repeats 2 --no-before
run benchmarks/sampling.py --config anchor --lengths 500 2000 --repeats 2 --no-before
