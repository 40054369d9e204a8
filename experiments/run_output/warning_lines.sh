#!/usr/bin/env bash
# Warning lines a user sees per stage: the demo's five commands and FocusLLaVA's two (stage=focus, its
# evaluation), with few steps, in a fresh workspace; every stage reads the previous one's output.
#   experiments/run_output/warning_lines.sh [<avglab source tree>]   (default: this checkout)
# A warning line = an output line (stdout + stderr) of a Python warning ("<file>.py:<line>: ...") or a
# WARNING-level log record.
set -euo pipefail
tree=$(cd "${1:-$(dirname "$0")/../..}" && pwd)
python=${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}
workspace=$(mktemp -d)
few="stage.max_steps=20 stage.val_every=10"
printf '| stage | output lines | warning lines |\n|---|---|---|\n'
for stage in pretrain instruct multigran rglf_cached eval focus eval_focus; do
  case $stage in
    eval) args="stage=eval stage.latency_samples=4" ;;
    rglf_cached) args="stage=rglf_cached $few stage.cache_train_samples=320 stage.cache_val_samples=16" ;;
    focus) args="stage=focus focus=both $few stage.previous=pretrain" ;;
    eval_focus)
      focus=$("$python" -c "import json,sys; print(json.load(open(sys.argv[1]))['path'])" "$workspace/stages/focus.json")
      args="stage=eval focus=both stage.latency_samples=4 init_from=$focus" ;;
    *) args="stage=$stage $few" ;;
  esac
  out="$workspace/$stage.log"
  # shellcheck disable=SC2086
  (cd "$tree" && PYTHONPATH="$tree/src" AVGLAB_WORKSPACE="$workspace" OMP_NUM_THREADS=1 \
    "$python" -m avglab $args >"$out" 2>&1)
  printf '| %s | %s | %s |\n' "$stage" "$(wc -l <"$out")" "$(grep -cE '\.py:[0-9]+: |\]\[WARNING\]' "$out" || true)"
done
echo "logs: $workspace"
