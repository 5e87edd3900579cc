#!/usr/bin/env bash
# One prepared script for a lent GPU machine (JAX preinstalled there, no network):
# the throughput benchmark, then a full Beauty training + test, all under 9 minutes.
# Everything it prints and the run's files land under $OUT.
#
# Prepare once, here, in the repository root (wheels for what the GPU image lacks, and the data):
#   echo /.whl/ >> .git/info/exclude; echo /.gpudata/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl polars==2.1.0 polars-runtime-32==2.1.0 ml-collections==1.1.0
#   mkdir -p .gpudata/beauty/s3rec && cp ../shared/data/beauty/s3rec/Beauty.txt .gpudata/beauty/s3rec/
# Run with the device tool: command "bash bench/gpu.sh", carry [".whl", ".gpudata"], timeout_s 600.
# `bash bench/gpu.sh scale` instead runs the N = 10^6-item row (issue 21): the synthetic catalog
# (generated there, ~10 s), training and 32-step inference, item table scored in blocks of 65,536,
# then training with the sampled softmax.
set -uo pipefail
MODE=${1:-all}
OUT=${OUT:-/tmp/diffurec_gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD DIFFUREC_DATA=$PWD/.gpudata DIFFUREC_CACHE=/tmp/diffurec_cache
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
  | tee -a "$OUT/gpu.txt"

if [ "$MODE" = scale ]; then
  for part in train infer; do
    timeout 190 python3 bench/throughput.py --config configs/synthetic.py:items_1e6,diffurec \
      --part $part --steps 10 --users 2048 --eval_batch_size 512 --nofour_seeds \
      --config.catalog.block=65536 2>&1 | tee "$OUT/scale_$part.txt"
  done
  # The sampled softmax at the same size (1,024 uniform negatives; docs/performance.md).
  timeout 170 python3 bench/throughput.py --config configs/synthetic.py:items_1e6,diffurec \
    --part train --steps 10 --nofour_seeds --config.catalog.block=65536 \
    --config.catalog.loss=sampled --config.catalog.negatives=1024 2>&1 \
    | tee "$OUT/scale_train_sampled.txt"
  exit 0
fi

# 1) Throughput: fast path and padded baseline in the same process (ratios in the JSON line).
timeout 200 python3 bench/throughput.py --config configs/beauty.py:diffurec \
  --config.train.eval_batch_size=2048 --steps 40 --users 8192 --baseline 2>&1 \
  | tee "$OUT/throughput.txt"

# 2) Beauty trained to convergence and tested once, timed end to end (goal: < 300 s on one H100).
start=$(date +%s)
timeout 330 python3 bin/train.py --config configs/beauty.py:diffurec \
  --config.train.eval_batch_size=4096 --config.train.eval_every=2 --config.train.patience=3 \
  --workdir /tmp/beauty_gpu 2>&1 | tr '\r' '\n' | grep -v 'it/s' | tee "$OUT/train.txt"
echo "wall_s $(( $(date +%s) - start ))" | tee -a "$OUT/train.txt"
cp /tmp/beauty_gpu/results.json /tmp/beauty_gpu/metrics.jsonl "$OUT/" 2>/dev/null
tail -n 3 "$OUT/throughput.txt"
