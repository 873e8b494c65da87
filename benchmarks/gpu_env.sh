# Sourced (from the repository root) by the scripts that run benchmarks on a bare GPU box:
# benchmarks/store_budget_gpu.sh and benchmarks/store_scale_gpu.sh. Wheels carried in .whl/
# (if any) are installed to /tmp/site, for a box without a package index; then the
# environment both runs use (unbuffered logs, no telemetry). The caller sets OMP_NUM_THREADS.
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 CI=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
