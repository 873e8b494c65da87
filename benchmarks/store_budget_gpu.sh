#!/usr/bin/env bash
# The GPU run behind the README's "STORE with a SASRec-sized budget" table: STORE's Phase B
# at up to 40 epochs on one GPU, ml-100k-quality and scientific-quality side by side (seed
# 0, each capped by --time-budget-s), plus the Phase B engine comparison (plain torch vs
# DeepSpeed ZeRO-2) on the same GPU. Run from the repository root:
#
#     BUDGET=470 OUT=/tmp/out bash benchmarks/store_budget_gpu.sh
#
# Needs: torch with CUDA and the project's Python dependencies except mlflow/prefect (both
# runs set tracking.enabled=false). Wheels in .whl/ (if any) are installed to /tmp/site
# first, for a box without a package index. The ml-100k files are read from
# gpu/ws-ml-budget-seed0/cache (a copy of a workspace's cache; the box has no internet), the
# Scientific files from gpu/data/scientific. Results and logs go to $OUT.
set -u
OUT=${OUT:?set OUT to a folder for results and logs}
BUDGET=${BUDGET:-470}
# shellcheck source=benchmarks/gpu_env.sh
. benchmarks/gpu_env.sh
export OMP_NUM_THREADS=4
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, transformers, deepspeed; print(sys.version.split()[0], \
torch.__version__, transformers.__version__, deepspeed.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1

run() {  # $1 tag, $2 config, then overrides
  local tag=$1 config=$2
  shift 2
  python3 -m benchmarks.store_budget --config "$config" --seed 0 --epochs 40 \
    --time-budget-s "$BUDGET" --probe-steps 100 --name "store_budget_${config}_gpu" \
    --set tracking.enabled=false --set "workspace=$PWD/gpu/ws-$tag" \
    --set tokenizer_train.deepspeed.enabled=false --set recommender_train.deepspeed.enabled=false \
    "$@" > "$OUT/$tag.log" 2>&1
  local status=$?
  echo "exit $status" >> "$OUT/$tag.log"
  # only a finished run's json: a failed one must not ship the committed file of that name
  [ "$status" -eq 0 ] && cp "benchmarks/results/store_budget_${config}_gpu.json" "$OUT/"
}
run ml ml-100k-quality &
run sci scientific-quality --set "data.path=$PWD/gpu/data/scientific" &
(  # plain torch vs DeepSpeed ZeRO-2 on this GPU, once ml-100k's Phase A is written
  for _ in $(seq 1 60); do
    [ -f gpu/ws-ml-budget-seed0/models/tokenizer-store/metadata.json ] && break
    sleep 5
  done
  timeout 200 python3 -m benchmarks.phase_b_throughput --config ml-100k-quality --steps 200 \
    --decode-users 943 --set "workspace=$PWD/gpu/ws-ml-budget-seed0" \
    --set tracking.enabled=false > "$OUT/phase_b.log" 2>&1
  status=$?
  echo "exit $status" >> "$OUT/phase_b.log"
  # on failure the file below is the committed CPU result: never ship it as the GPU's
  [ "$status" -eq 0 ] && cp benchmarks/results/phase_b_ml-100k-quality.json \
    "$OUT/phase_b_ml-100k-quality_gpu.json"
) &
wait
