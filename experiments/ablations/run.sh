#!/usr/bin/env bash
# The whole study on the embedded default: Table 4 rows, k / alpha / token-cost sweeps, then the report.
# Needs the demo's stage-3 output in $AVGLAB_WORKSPACE (default ./workspace): `make demo` (or stages 1-3).
# Usage: bash experiments/ablations/run.sh [extra Hydra overrides for every job]
set -euo pipefail
WS=${AVGLAB_WORKSPACE:-workspace}
OUT=${OUT:-$WS/multirun/ablations-$(date +%Y%m%d-%H%M%S)}
start=$(date +%s)
python -m avglab -m experiment=ablations \
    ablation=full,fixed,random,image_only,granularity_set,gumbel,no_rank,no_ce "$@" hydra.sweep.dir="$OUT/table4"
python -m avglab -m experiment=ablations stage=rglf_cached router.k=1,2,4,8 "$@" hydra.sweep.dir="$OUT/k"
python -m avglab -m experiment=ablations stage=rglf_cached stage.alpha=0.01,0.03,0.1,0.3,1 "$@" \
    hydra.sweep.dir="$OUT/alpha"
echo "table 4 + k + alpha: $(( $(date +%s) - start )) s" | tee "$OUT/timing.txt"
python -m avglab -m experiment=ablations stage=rglf_cached router.token_cost=0,0.01,0.02,0.035,0.05,0.07 "$@" \
    hydra.sweep.dir="$OUT/token_cost"
echo "with the token-cost sweep: $(( $(date +%s) - start )) s" | tee -a "$OUT/timing.txt"
python -m avglab.tools.report "$OUT/table4" "$OUT/k" "$OUT/alpha" "$OUT/token_cost" --out experiments/ablations
