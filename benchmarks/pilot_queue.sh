#!/usr/bin/env bash
# Protocol 2's pilots as two background queues, one thread each (docs/benchmarks.md, "Version 2").
# Every finished run is cached, so a queue killed at a session's end continues where it stopped
# when started again. Runs go in the order that answers the pilot's questions soonest.
#
#   setsid nohup benchmarks/pilot_queue.sh seed-noise &   # lora vs PEFT ShiRA, r_eq 2, seeds 1-8
#   setsid nohup benchmarks/pilot_queue.sh admission &    # fft vs lora at r_eq 1 and 2, 150 / 600 steps
#   setsid nohup benchmarks/pilot_queue.sh admission-r1 & # ShiRA vs LoRA at r_eq 1, seeds 1-2
#   setsid nohup benchmarks/pilot_queue.sh peers &        # the peer queue: arithmetic, r_eq 2, 150 steps
#   setsid nohup benchmarks/pilot_queue.sh peers-a &      # the same, split over two cores: fft, lora
#   setsid nohup benchmarks/pilot_queue.sh peers-b &      # sparse-random, peft-supra, peft-shira
#   setsid nohup benchmarks/pilot_queue.sh oracle &       # issue 25's split pilot, selection seed 0
#   setsid nohup benchmarks/pilot_queue.sh revision &     # issue 25's candidate, selection seed 0
#   setsid nohup benchmarks/pilot_queue.sh revision-ablation &  # its rank part off; split at 3e-3
#   setsid nohup benchmarks/pilot_queue.sh revision-seeds &  # the candidate, selected + 5 seeds
#   setsid nohup benchmarks/pilot_queue.sh verdict &      # the candidate: 3e-4 at seed 0, seeds 1-5
#   setsid nohup benchmarks/pilot_queue.sh verdict-peer & # ShiRA seed 5, the candidate's ablations
#   setsid nohup benchmarks/pilot_queue.sh verdict-peer2 & # the exchange candidate, ablations, peers
#   setsid nohup benchmarks/pilot_queue.sh allocation &   # spreads over layers, then admission-r1
#   setsid nohup benchmarks/pilot_queue.sh allocation-100 &  # the same at selection seed 100
#   setsid nohup benchmarks/pilot_queue.sh split-rates &  # the split, each part at its own rate
#   setsid nohup benchmarks/pilot_queue.sh split-rates-2 &  # sparse-sampled at 3e-3, LoRA at 100
#   setsid nohup benchmarks/pilot_queue.sh eva &          # PEFT LoRA with EVA's start
#   setsid nohup benchmarks/pilot_queue.sh doubling &     # ShiRA at r_eq 4: does the budget bind?
#   setsid nohup benchmarks/pilot_queue.sh lora-r1 &      # LoRA's rate at r_eq 1 (selection seed)
#   setsid nohup benchmarks/pilot_queue.sh lora-ga &      # PEFT LoRA with LoRA-GA's start
#   setsid nohup benchmarks/pilot_queue.sh loraplus &     # PEFT LoRA trained as LoRA+
#   setsid nohup benchmarks/pilot_queue.sh doubling-600 & # ShiRA at r_eq 2 and 4, 600 steps
#   setsid nohup benchmarks/pilot_queue.sh best-r1 &      # the best peer at r_eq 1, then the peers
#
# SPALORA_CACHE_ROOT moves the caches (default benchmarks/cache); logs: runs/queues/pilot-NAME.*
set -uo pipefail
cd "$(dirname "$0")/.."
name=$1
root=${SPALORA_CACHE_ROOT:-benchmarks/cache}
mkdir -p runs/queues
log=runs/queues/pilot-$name
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
PY=${PYTHON:-.venv/bin/python}

run() {  # profile method r_eq lr seed [variant...]
  local profile=$1 method=$2 r_eq=$3 lr=$4 seed=$5
  shift 5
  local extra=()
  for v in "$@"; do extra+=(--variant "$v"); done
  echo "$(date -u +%FT%TZ) start $profile $method r$r_eq lr=$lr seed=$seed" >> "$log.log"
  $PY -m benchmarks runs --profile "$profile" --task arithmetic --r-eq "$r_eq" --method "$method" \
    --lr "$lr" --seeds "$seed" --cache "$root/accuracy-$profile" --no-progress "${extra[@]}" \
    >> "$log.log" 2>> "$log.err"
  local rc=$?  # before any other expansion: $(date) would reset $?
  echo "$(date -u +%FT%TZ) exit $rc" >> "$log.log"
}

case $name in
  seed-noise)  # the rates protocol 1 chose on seed 0 (docs/results/accuracy.md), seeds 1-8;
    # seeds 1-5 first (they are also the peer queue's runs where selection agrees), then the
    # r_eq 1 admission pair, then seeds 6-8
    for seed in 1 2 3 4 5; do
      run v2 lora 2 1e-3 "$seed"
      run v2 peft-shira 2 1e-2 "$seed"
    done
    run v2 peft-shira 1 1e-2 1
    for seed in 6 7 8; do
      run v2 lora 2 1e-3 "$seed"
      run v2 peft-shira 2 1e-2 "$seed"
    done ;;
  peers)  # selection on seed 0 (and 100 where close), then 5 reported seeds, per method; the
    # methods whose runs the seed-noise queue is also making come last
    echo "$(date -u +%FT%TZ) start peers" >> "$log.log"
    $PY -m benchmarks v2 --tasks arithmetic --budgets 2 --seeds 5 --no-progress \
      --methods rosa,peft-lora,sparse-random,peft-supra,fft,lora,peft-shira \
      --cache "$root/accuracy-v2" --out runs/queues/peers-report >> "$log.log" 2>> "$log.err"
    echo "$(date -u +%FT%TZ) exit $?" >> "$log.log" ;;
  peers-a|peers-b)  # the peer queue split in two disjoint halves, one per core (the cache is
    # one file per run, so two processes on disjoint methods never touch the same run)
    if [ "$name" = peers-a ]; then methods=fft,lora; else methods=sparse-random,peft-supra,peft-shira; fi
    echo "$(date -u +%FT%TZ) start $name" >> "$log.log"
    $PY -m benchmarks v2 --tasks arithmetic --budgets 2 --seeds 5 --no-progress --methods "$methods" \
      --cache "$root/accuracy-v2" --out "runs/queues/$name-report" >> "$log.log" 2>> "$log.err"
    echo "$(date -u +%FT%TZ) exit $?" >> "$log.log" ;;
  admission)  # does full fine-tuning beat LoRA by 3x the target effect? 150 and 600 steps
    for seed in 1 2; do
      run v2 fft 0 3e-4 "$seed"
      run v2 lora 1 1e-3 "$seed"
      run v2-600 fft 0 3e-4 "$seed"
      run v2-600 lora 2 1e-3 "$seed"
      run v2-600 lora 1 1e-3 "$seed"
    done ;;
  oracle)  # issue 25, direction 1: at r_eq 2 (whole ranks: 0, 50 or 100% on rank) a mixed split
    # with S on a random support from step 0 at 10x LoRA's rate, against all-sparse (ours and
    # ShiRA) and LoRA at the same seed. Seed 0 is the selection seed: never reported.
    run v2 split-random 2 1e-3 0 rank_fraction=0.5
    run v2 sparse-random 2 1e-2 0
    run v2 peft-shira 2 1e-2 0
    run v2 lora 2 1e-3 0
    run v2 split-random 2 3e-4 0 rank_fraction=0.5 ;;
  revision-ablation)  # the candidate without its rank part, and the split at LoRA's 3e-3
    run v2 spalora-gradual-sparse 2 1e-3 0
    run v2 split-random 2 3e-3 0 rank_fraction=0.5 ;;
  revision-seeds)  # the candidate through the protocol: its grid at seed 0 (and 100 where
    # close), then 5 reported seeds at the chosen rate, as every peer
    echo "$(date -u +%FT%TZ) start revision-seeds" >> "$log.log"
    $PY -m benchmarks v2 --tasks arithmetic --budgets 2 --seeds 5 --no-progress \
      --methods spalora-gradual --cache "$root/accuracy-v2" --out runs/queues/revision-report \
      >> "$log.log" 2>> "$log.err"
    echo "$(date -u +%FT%TZ) exit $?" >> "$log.log" ;;
  revision-ablations)  # the candidate's parts, each paired at the selection seed: the cubic
    # schedule against one cut at 60%, and (revision-ablation) the rank part
    run v2 spalora-gradual-cut 2 1e-3 0
    run v2 spalora-gradual-sparse 2 1e-3 0 ;;
  admission-r1)  # the second condition: is ShiRA below LoRA by 3 targets at r_eq 1 too?
    for seed in 1 2; do
      run v2 peft-shira 1 1e-2 "$seed"
      run v2 lora 1 1e-3 "$seed"
    done ;;
  verdict)  # the candidate's reported seeds at 1e-3, its selection rate so far; the grid's
    # downward extension (3e-4, the rule's next run) first, so the choice is known before the seeds
    # are read; 1e-2 (the grid's last point, after 3e-3 was clearly worse) last
    run v2 spalora-gradual 2 3e-4 0
    for seed in 1 2 3 4 5; do run v2 spalora-gradual 2 1e-3 "$seed"; done
    run v2 spalora-gradual 2 1e-2 0 ;;
  verdict-peer)  # ShiRA's fifth reported seed (1-4 are the seed-noise pilot's), then the
    # candidate's ablations at the selection seed
    run v2 peft-shira 2 1e-2 5
    run v2 spalora-gradual-sparse 2 1e-3 0
    run v2 spalora-gradual-cut 2 1e-3 0 ;;
  verdict-peer2)  # the exchange candidate (at the budget throughout: the speed bar) at the
    # selection seed, paired with sparse-random and the gradual candidate; then the ablations
    # and the peer queue
    run v2 spalora-exchange 2 1e-3 0
    run v2 spalora-gradual-sparse 2 1e-3 0
    run v2 spalora-gradual-cut 2 1e-3 0
    "$0" peers ;;
  verdict-peer3)  # verdict-peer2 after its exchange run was stopped (its IRLS drain did nothing
    # after an exchange; fixed): the exchange candidate again, then the cut ablation, then peers
    run v2 spalora-exchange 2 1e-3 0
    run v2 spalora-gradual-cut 2 1e-3 0
    "$0" peers ;;
  allocation)  # issue 25: random entries spread over layers by their step-0 gradient mass
    # (sparse-credit), by PEFT ShiRA's r (m + n) per layer in our sparse-random and in the first
    # candidate, at the selection seed; then the second condition's admission
    run v2 sparse-credit 2 1e-2 0
    run v2 sparse-random-lora 2 1e-2 0
    run v2 spalora-gradual-lora 2 1e-3 0
    "$0" admission-r1 ;;
  allocation-100)  # the allocation pilots at the second selection seed (100, never reported):
    # one seed's gap carries a seed SD of 0.01-0.02, so a candidate's lead is read at two
    run v2 sparse-random-lora 2 1e-2 100
    run v2 sparse-random 2 1e-2 100
    run v2 peft-shira 2 1e-2 100
    run v2 spalora-gradual-lora 2 1e-3 100
    "$0" admission-r1 ;;
  split-rates)  # issue 25: the oracle's split with each part at its own chosen rate (LoRA at
    # 3e-3, S at 1e-2, ShiRA's spread) and entries drawn by their step-0 |g| (sparse-sampled),
    # paired at both selection seeds with LoRA at 3e-3 and ShiRA's spread alone; then LoRA's
    # rate at r_eq 1
    run v2 split-random-lora 2 3e-3 0 rank_fraction=0.5
    run v2 sparse-sampled 2 1e-2 0
    run v2 split-random-lora 2 3e-3 100 rank_fraction=0.5
    run v2 sparse-sampled 2 1e-2 100
    run v2 peft-lora 2 3e-3 100
    "$0" lora-r1 ;;
  split-rates-2)  # split-rates after sparse-sampled lost 0.12 nats at seed 0 with the Fisher
    # mask's high-rate spike (steps 10-20): its rate's next grid point instead of a second seed
    # at 1e-2; LoRA at the second selection seed; then the doubling runs
    run v2 sparse-sampled 2 3e-3 0
    run v2 peft-lora 2 3e-3 100
    "$0" doubling ;;
  eva)  # issue 25, direction 6: does a data-driven start (PEFT's EVA) speed LoRA up at its
    # chosen rate? Paired with PEFT LoRA at both selection seeds; then the doubling runs
    run v2 peft-lora-eva 2 3e-3 0
    run v2 peft-lora-eva 2 3e-3 100
    "$0" doubling ;;
  doubling)  # admission's second reference (docs/benchmarks.md): does the best peer gain 3
    # targets from twice the budget? ShiRA at r_eq 4 at its r_eq 2 rate, the reported seeds 1-2
    for seed in 1 2; do run v2 peft-shira 4 1e-2 "$seed"; done
    "$0" lora-r1 ;;
  lora-r1)  # LoRA's rate at r_eq 1 on the selection seed (the admission pair ran it at 1e-3)
    run v2 lora 1 3e-3 0
    run v2 lora 1 1e-2 0
    run v2 lora 1 1e-3 0 ;;
  lora-ga)  # issue 25, direction 6 in its gradient form (docs/results/README.md): LoRA-GA's start
    # at selection seed 0, its rate not assumed to be LoRA's
    run v2 peft-lora-ga 2 3e-3 0
    run v2 peft-lora-ga 2 1e-3 0 ;;
  lora-ga-low)  # LoRA-GA's grid edge: 1e-3 beat 3e-3 at seed 0, so the next rate down
    run v2 peft-lora-ga 2 3e-4 0 ;;
  loraplus)  # issue 25, the rates: LoRA+ (B at 16x A's rate) at selection seed 0, paired with
    # PEFT LoRA at 3e-3 (docs/results/README.md)
    run v2 peft-loraplus 2 1e-3 0
    run v2 peft-loraplus 2 3e-4 0 ;;
  doubling-600)  # if the doubling reference admits neither budget at 150 steps (docs/benchmarks.md):
    # does the budget bind at 600 steps? ShiRA at r_eq 2 and 4 at its 150-step rate, seeds 1-2
    # (SEEDS="1" and SEEDS="2" split it over two cores)
    for seed in ${SEEDS:-1 2}; do
      run v2-600 peft-shira 2 1e-2 "$seed"
      run v2-600 peft-shira 4 1e-2 "$seed"
    done ;;
  loraplus-2)  # LoRA+ came out 0.008 below PEFT LoRA at 1e-3, the top of its pilot grid (under
    # the 0.010 bar): the next rate up at seed 0, then 1e-3 at the second selection seed
    run v2 peft-loraplus 2 3e-3 0
    run v2 peft-loraplus 2 1e-3 100 ;;
  best-r1)  # admission at r_eq 1 against the best peer at r_eq 2 (docs/benchmarks.md): LoRA at
    # its r_eq 1 selection rate on reported seeds 1-2, ShiRA's r_eq 1 grid around 1e-2; then peers
    for seed in 1 2; do run v2 lora 1 3e-3 "$seed"; done
    run v2 peft-shira 1 3e-3 0
    run v2 peft-shira 1 3e-2 0
    "$0" peers ;;
  revision)  # issue 25's candidate for revision 4 (spalora-gradual, S at 10x LoRA's rate) at
    # the oracle's rates, selection seed 0: paired with the oracle's runs at the same seed
    run v2 spalora-gradual 2 1e-3 0
    run v2 spalora-gradual 2 3e-3 0 ;;
  *) echo "unknown queue $name (seed-noise | admission | admission-r1 | peers | oracle | revision | revision-ablation | revision-ablations | revision-seeds | verdict | verdict-peer | verdict-peer2 | verdict-peer3 | allocation | allocation-100 | split-rates | split-rates-2 | eva | doubling | lora-r1 | best-r1 | lora-ga | peers-a | peers-b | loraplus | doubling-600 | lora-ga-low | loraplus-2)" >&2; exit 2 ;;
esac
