#!/usr/bin/env bash
# Learning-curve runs behind docs/results.md (Figures 4 and 5 of the paper, small budget).
#   bash benchmarks/learning_runs.sh [STEPS] [JOBS]      # defaults: 200000 steps, 2 parallel runs
# Environment: SEEDS (default "1 2 3"), GROUPS (any of fig5 fig4, default both),
#   ESTIMATORS (Figure 5's --meta-grad choices), OUT (default runs/learning).
# Each run is `metagrad-rl train ...` into $OUT/<name>; finished runs are skipped, so the
# script can be re-run after an interruption (killed runs restart from their last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200000}
JOBS=${2:-2}
SEEDS=${SEEDS:-1 2 3}
GROUPS=${GROUPS:-fig5 fig4}
ESTIMATORS=${ESTIMATORS:-eq17 lirpg three-term exact sampling-aware}
BIN=${BIN:-.venv/bin/metagrad-rl}
OUT=${OUT:-runs/learning}
mkdir -p "$OUT"
{
  for seed in $SEEDS; do
    case " $GROUPS " in *" fig5 "*)
      # Figure 5: the estimators on Hopper-v5 (CLN policy)
      for mg in $ESTIMATORS; do
        echo "cln-$mg-Hopper-v5-s$seed --algo cln --meta-grad $mg --env Hopper-v5 --seed $seed"
      done;;
    esac
    case " $GROUPS " in *" fig4 "*)
      # Figure 4: PPO vs LIRPG vs CLN (eq17) on three tasks
      for env in Hopper-v5 HalfCheetah-v5 Walker2d-v5; do
        echo "ppo-$env-s$seed --algo ppo --env $env --seed $seed"
        echo "lirpg-$env-s$seed --algo lirpg --env $env --seed $seed"
        [ "$env" = Hopper-v5 ] || echo "cln-eq17-$env-s$seed --algo cln --meta-grad eq17 --env $env --seed $seed"
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
