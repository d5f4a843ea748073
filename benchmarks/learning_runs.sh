#!/usr/bin/env bash
# Learning-curve runs behind docs/results.md (Figures 4 and 5 of the paper, small budget).
#   bash benchmarks/learning_runs.sh [STEPS] [JOBS]      # defaults: 200000 steps, 2 parallel runs
# Environment: SEEDS (default "1 2 3"), RUN_GROUPS (any of fig5 fig4, default both),
#   ESTIMATORS (Figure 5's --meta-grad choices), FIG4_ALGOS (any of ppo lirpg cln-eq17),
#   OUT (default runs/learning), BIN (the metagrad-rl command).
# Each run is `metagrad-rl train ...` into $OUT/<name>; finished runs are skipped, so the
# script can be re-run after an interruption (killed runs restart from their last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200000}
JOBS=${2:-2}
SEEDS=${SEEDS:-1 2 3}
RUN_GROUPS=${RUN_GROUPS:-fig5 fig4}
FIG4_ALGOS=${FIG4_ALGOS:-ppo lirpg cln-eq17}
ESTIMATORS=${ESTIMATORS:-eq17 lirpg three-term exact sampling-aware}
BIN=${BIN:-.venv/bin/metagrad-rl}
OUT=${OUT:-runs/learning}
mkdir -p "$OUT"
{
  for seed in $SEEDS; do
    case " $RUN_GROUPS " in *" fig5 "*)
      # Figure 5: the estimators on Hopper-v5 (CLN policy)
      for mg in $ESTIMATORS; do
        echo "cln-$mg-Hopper-v5-s$seed --algo cln --meta-grad $mg --env Hopper-v5 --seed $seed"
      done;;
    esac
    case " $RUN_GROUPS " in *" fig4 "*)
      # Figure 4: PPO vs LIRPG vs CLN (eq17) on three tasks
      for env in Hopper-v5 HalfCheetah-v5 Walker2d-v5; do
        for algo in $FIG4_ALGOS; do
          case $algo in
            ppo|lirpg) echo "$algo-$env-s$seed --algo $algo --env $env --seed $seed";;
            # on Hopper-v5 this run is Figure 5's eq17 run
            cln-eq17) [ "$env" = Hopper-v5 ] ||
              echo "cln-eq17-$env-s$seed --algo cln --meta-grad eq17 --env $env --seed $seed";;
          esac
        done
      done;;
    esac
  done
} | xargs -P "$JOBS" -L 1 bash -c '
  name=$0
  dir='"$OUT"'/$name
  if [ -f "$dir/summary.json" ]; then exit 0; fi
  if [ -f "$dir/checkpoint.pt" ]; then resume=--resume; else resume=--overwrite; fi
  '"$BIN"' train "$@" --total-steps '"$STEPS"' --out "$dir" $resume --no-progress \
    > "'"$OUT"'/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name"
'
