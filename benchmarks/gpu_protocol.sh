#!/usr/bin/env bash
# Protocol 2's peers on one GPU: every method's selection and reported seeds, then the decision
# table, in one script (docs/benchmarks.md, "Version 2"). One process per method, side by side on
# the one GPU (a 135M model leaves it mostly idle otherwise); each writes its runs into the
# GPU cache (benchmarks/cache/accuracy-PROFILE-cuda), which is safe to share: a run is one file,
# written under a temporary name and renamed.
#
#   benchmarks/gpu_protocol.sh [PROFILE] [BUDGETS] [SEEDS]     # defaults: v2 2 5
#
# Writes docs/results/gpu/accuracy-v2.md and paired.csv; logs under runs/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
profile=${1:-v2} budgets=${2:-2} seeds=${3:-5}
methods=(fft lora rosa peft-lora peft-shira peft-supra sparse-random)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
PY=${PYTHON:-.venv/bin/python}
mkdir -p runs/gpu
started=$(date +%s)
pids=()
for m in "${methods[@]}"; do
  $PY -m benchmarks v2 --device cuda --profile "$profile" --budgets "$budgets" --seeds "$seeds" \
    --methods "$m" --out "runs/gpu/$m" --no-progress > "runs/gpu/$m.log" 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
$PY -m benchmarks v2 --device cuda --profile "$profile" --budgets "$budgets" --seeds "$seeds" \
  --methods "$(IFS=,; echo "${methods[*]}")" --out docs/results/gpu --report-only
echo "gpu protocol: $(( $(date +%s) - started )) s, exit $rc"
exit $rc
