#!/usr/bin/env bash
# The training-free baselines beside AVG-LLaVA and FocusLLaVA on the embedded default, on the workspace of a
# finished `make demo` (stage outputs of stages 1-3) and a 5-seed stage-4 multirun of that stage 3:
#   experiments/baselines/run.sh <stage-4 seed multirun folder (<seed>/eval/metrics.json)>
# Writes evaluations under $AVGLAB_WORKSPACE/runs/baselines/ and experiments/baselines/{table.md,pareto.png}.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}
seeds=$1
out=${AVGLAB_WORKSPACE:-workspace}/runs/baselines
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# FastV after layer 1 of the tiny LLM's 2 at three budgets, VTW after layer 1, PruMerge+ at its adaptive
# default and at a budget near the router's prefill FLOPs (~45% of the finest level's on this set)
reductions='[{name:fastv,layer:1,keep:0.5},{name:fastv,layer:1,keep:0.25},{name:fastv,layer:1,keep:0.125},{name:vtw,layer:1},prumerge_plus,{name:prumerge_plus,keep:0.4}]'
evaluate() {  # <tag> <overrides...>
  local tag=$1; shift
  "$python" -m avglab stage=eval stage.latency_samples=0 "run_dir=$out/$tag" "$@"
}
# stage 2 = plain LLaVA-NeXT (finest level, what the baselines are applied to in practice); stage 3 = the
# multi-granularity model AVG-LLaVA's router routes over
evaluate stage2 stage.previous=instruct router=none "stage.compare_reduce=$reductions"
evaluate stage3 stage.previous=multigran router=none "stage.compare_reduce=$reductions"
evaluate random stage.previous=multigran router=random stage.compare_fixed=false
# FocusLLaVA (both samplers) replaces stage 2 on top of stage 1, as in its paper
"$python" -m avglab stage=focus focus=both "run_dir=$out/focus_train"
evaluate focus stage.previous=focus focus=both stage.compare_fixed=false
args=(stage2="$out/stage2" stage3="$out/stage3" random="$out/random" focus="$out/focus")
for dir in "$seeds"/*/eval; do
  seed=$(basename "$(dirname "$dir")")
  args+=("router_seed$seed=$dir")
done
"$python" experiments/baselines/collect.py --out experiments/baselines "${args[@]}"
