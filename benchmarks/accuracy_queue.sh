#!/usr/bin/env bash
# One background queue of the full accuracy protocol: the method groups given run one after the
# other on one task and budget, one thread each (two queues, one per task, use the 2 cores best:
# docs/benchmarks.md). Every finished run is cached, so a queue killed at a session's end
# continues where it stopped when started again with the same arguments.
#
#   setsid nohup benchmarks/accuracy_queue.sh bbc-topic 8 spalora,rosa fft,peft-lora,sparse &
#
# Logs: runs/queues/TASK-rREQ.log (progress lines) and .err (library output).
set -uo pipefail
cd "$(dirname "$0")/.."
task=$1 budget=$2
shift 2
mkdir -p runs/queues
log=runs/queues/$task-r$budget
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
for methods in "$@"; do
  echo "$(date -u +%FT%TZ) start $methods" >> "$log.log"
  .venv/bin/python -m benchmarks accuracy --profile full --budgets "$budget" --tasks "$task" \
    --methods "$methods" --no-progress >> "$log.log" 2>> "$log.err"
  rc=$?  # before any other expansion: $(date) would reset $?
  echo "$(date -u +%FT%TZ) exit $rc $methods" >> "$log.log"
done
