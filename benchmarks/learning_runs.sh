#!/usr/bin/env bash
# Learning-curve runs behind docs/results.md (Figures 4 and 5 of the paper, small budget).
#   bash benchmarks/learning_runs.sh [STEPS] [JOBS]      # defaults: 200000 steps, 2 parallel runs
# Environment: SEEDS (default "1 2 3"), RUN_GROUPS (any of fig5 fig4 ladder walker, default
#   fig5 fig4; ladder: issue 15's Hopper-v5 ablation ladder -- ppo, cln-rin0 (r_in_coef 0: the
#   conditioned architecture alone), cln-frozen (eta_lr 0: a fixed random reward), cln-eq17,
#   lirpg; walker: ppo, cln-frozen, cln-eq17 on Walker2d-v5; rin-sweep: cln-eq17 on Hopper-v5
#   with --r-in-coef in RIN_COEFS (default "0.01 0.03") on SWEEP_SEEDS (default "1 2 3");
#   ladder-ln: PPO with --conditioning layernorm on SWEEP_SEEDS; ladder-frozen-rin0: CLN with
#   r_in off and eta frozen on SWEEP_SEEDS),
#   ESTIMATORS (Figure 5's --meta-grad choices, checked against the registry in
#   metagrad_rl/trainers/meta_grads.py; default: eq17 lirpg three-term exact sampling-aware;
#   "all": every entry of the registry), FIG4_ALGOS (any of ppo lirpg cln-eq17), OUT (default runs/learning), BIN (the
#   metagrad-rl command), PYTHON (the venv's python, to read the registry).
# Each run is `metagrad-rl train ...` into $OUT/<name>; finished runs are skipped, so the
# script can be re-run after an interruption (killed runs restart from their last checkpoint).
# NICE (default 0) lowers the runs' priority so the machine stays usable. Issue 15's runs:
#   SEEDS="1 2 3 4 5" RUN_GROUPS="ladder rin-sweep ladder-ln walker" OUT=../runs/issue15 NICE=10 \
#     bash benchmarks/learning_runs.sh 1000000 2
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-200000}
JOBS=${2:-2}
SEEDS=${SEEDS:-1 2 3}
RUN_GROUPS=${RUN_GROUPS:-fig5 fig4}
FIG4_ALGOS=${FIG4_ALGOS:-ppo lirpg cln-eq17}
BIN=${BIN:-.venv/bin/metagrad-rl}
PYTHON=${PYTHON:-.venv/bin/python}
# Figure 5's five estimators by default, each checked against the --meta-grad registry (an
# unknown name stops here with the registry's one-line error); ESTIMATORS=all runs every entry
FIG5="eq17 lirpg three-term exact sampling-aware"
ESTIMATORS=$("$PYTHON" -c '
import sys
from metagrad_rl.errors import ConfigError
from metagrad_rl.trainers.meta_grads import META_GRADS, get
names = list(META_GRADS) if sys.argv[1:] == ["all"] else sys.argv[1:]
try:
    [get(n) for n in names]
except ConfigError as err:
    sys.exit(f"learning_runs.sh: ESTIMATORS: {err}")
print(*names)' ${ESTIMATORS:-$FIG5})
OUT=${OUT:-runs/learning}
NICE=${NICE:-0}
mkdir -p "$OUT"
{
  for seed in $SEEDS; do
    case " $RUN_GROUPS " in *" fig5 "*)
      # Figure 5: the estimators on Hopper-v5 (CLN policy)
      for mg in $ESTIMATORS; do
        echo "cln-$mg-Hopper-v5-s$seed --algo cln --meta-grad $mg --env Hopper-v5 --seed $seed"
      done;;
    esac
    case " $RUN_GROUPS " in *" ladder "*)
      # one change per rung, the same seeds and defaults otherwise
      env=Hopper-v5
      echo "ppo-$env-s$seed --algo ppo --env $env --seed $seed"
      echo "cln-rin0-$env-s$seed --algo cln --meta-grad eq17 --r-in-coef 0 --env $env --seed $seed"
      echo "cln-frozen-$env-s$seed --algo cln --meta-grad eq17 --eta-lr 0 --env $env --seed $seed"
      echo "cln-eq17-$env-s$seed --algo cln --meta-grad eq17 --env $env --seed $seed"
      echo "lirpg-$env-s$seed --algo lirpg --env $env --seed $seed";;
    esac
    case " $RUN_GROUPS " in *" ladder-ln "*)
      # the ladder's extra rung: PPO with a plain LayerNorm on its last hidden layer (what CLN
      # conditions), on SWEEP_SEEDS
      case " ${SWEEP_SEEDS:-1 2 3} " in *" $seed "*)
        echo "ppo-ln-Hopper-v5-s$seed --algo ppo --conditioning layernorm --env Hopper-v5 --seed $seed";;
      esac;;
    esac
    case " $RUN_GROUPS " in *" ladder-frozen-rin0 "*)
      # the architecture's other half: CLN with r_in off and eta frozen (no meta-step moves
      # the condition), on SWEEP_SEEDS
      case " ${SWEEP_SEEDS:-1 2 3} " in *" $seed "*)
        echo "cln-rin0-frozen-Hopper-v5-s$seed --algo cln --r-in-coef 0 --eta-lr 0 --env Hopper-v5 --seed $seed";;
      esac;;
    esac
    case " $RUN_GROUPS " in *" rin-sweep "*)
      # issue 15's follow-up: CLN eq17 with smaller intrinsic-reward weights (0.1 is the default,
      # the ladder's cln-eq17 rung), on the first three seeds
      case " ${SWEEP_SEEDS:-1 2 3} " in *" $seed "*)
        for c in ${RIN_COEFS:-0.01 0.03}; do
          echo "cln-eq17-rin$c-Hopper-v5-s$seed --algo cln --meta-grad eq17 --r-in-coef $c --env Hopper-v5 --seed $seed"
        done;;
      esac;;
    esac
    case " $RUN_GROUPS " in *" walker "*)
      env=Walker2d-v5
      echo "ppo-$env-s$seed --algo ppo --env $env --seed $seed"
      echo "cln-frozen-$env-s$seed --algo cln --meta-grad eq17 --eta-lr 0 --env $env --seed $seed"
      echo "cln-eq17-$env-s$seed --algo cln --meta-grad eq17 --env $env --seed $seed";;
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
   nice -n '"$NICE"' '"$BIN"' train "$@" --total-steps '"$STEPS"' --out "$dir" $resume --no-progress \
    > "'"$OUT"'/$name.log" 2>&1 && echo "done $name" || echo "FAILED $name"
'
