"""Cost of an 8-member k / alpha sweep with the feedback cache vs one plain RGLF run.

    python experiments/ablations/sweep_cost.py [--steps 60] [--out experiments/ablations/sweep_cost.json]

Runs, each as the command a user would type (one process per Hydra job, so start-up is counted):
1. plain:  ``python -m avglab stage=rglf`` for ``--steps`` steps of batch 16 (no cache);
2. sweep:  ``python -m avglab -m stage=rglf_cached router.k=1,2,4,8`` and
           ``python -m avglab -m stage=rglf_cached stage.alpha=0.01,0.03,0.3,1`` with the same steps and
           batch, starting from an empty cache (the first member builds it, the other 7 reuse it).
Both start from the workspace's stage-3 output in a scratch workspace (data and tokenizers linked, so the
workspace's stage pointers and caches are untouched). Writes wall-clock seconds, the fits' own seconds and
the cache build time, and the ratio sweep / plain. Run it alone on the machine: timings are shared-CPU
sensitive.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

K_VALUES = "1,2,4,8"
ALPHA_VALUES = "0.01,0.03,0.3,1"


def scratch_workspace(workspace: Path, scratch: Path) -> Path:
    """A workspace that shares data and tokenizers with ``workspace`` but nothing else."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True)
    for name in ("data", "tokenizers"):
        if (workspace / name).exists():
            (scratch / name).symlink_to((workspace / name).resolve())
    return scratch


def timed(args: list[str], env: dict) -> float:
    """Runs ``python -m avglab <args>``; returns its wall-clock seconds (fails loudly)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "avglab", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"python -m avglab {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return time.perf_counter() - start


def fit_metrics(folder: Path) -> list[dict]:
    """Fit metrics.json files below a run or multirun folder (evaluation ones excluded)."""
    found = [json.loads(p.read_text()) for p in sorted(folder.rglob("metrics.json"))]
    return [m for m in found if "fit_seconds" in m]


def main() -> None:
    """Runs both, writes and prints the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workspace", type=Path, default=Path(os.environ.get("AVGLAB_WORKSPACE", "workspace"))
    )
    parser.add_argument("--steps", type=int, default=60, help="router steps per run (tiny_rglf_cached: 60)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("experiments/ablations/sweep_cost.json"))
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/avglab_sweep_cost"))
    args = parser.parse_args()
    pointer = args.workspace / "stages" / "multigran.json"
    if not pointer.is_file():
        raise SystemExit(f"{pointer}: no stage-3 output; run `make demo` (or stages 1-3) first")
    stage3 = json.loads(pointer.read_text())["path"]
    ws = scratch_workspace(args.workspace, args.scratch)
    env = {**os.environ, "AVGLAB_WORKSPACE": str(ws)}
    samples = args.steps * args.batch
    common = [
        f"init_from={stage3}",
        f"stage.max_steps={args.steps}",
        f"stage.val_every={args.steps}",
        f"stage.batch_size={args.batch}",
        "stage.global_batch_size=null",
        f"checkpoint_every={args.steps}",
    ]
    plain_dir = ws / "plain"
    plain = timed(["stage=rglf", *common, f"hydra.run.dir={plain_dir}"], env)
    cached = [*common, f"stage.cache_train_samples={samples}", "stage.cache_val_samples=64"]
    sweep_k = timed(
        ["-m", "stage=rglf_cached", f"router.k={K_VALUES}", *cached, f"hydra.sweep.dir={ws}/k"], env
    )
    sweep_a = timed(
        ["-m", "stage=rglf_cached", f"stage.alpha={ALPHA_VALUES}", *cached, f"hydra.sweep.dir={ws}/alpha"],
        env,
    )
    members = fit_metrics(ws / "k") + fit_metrics(ws / "alpha")
    plain_fit = fit_metrics(plain_dir)[0]["fit_seconds"]
    result = {
        "steps": args.steps,
        "batch_size": args.batch,
        "members": len(members),
        "plain_wall_seconds": plain,
        "plain_fit_seconds": plain_fit,
        "sweep_wall_seconds": sweep_k + sweep_a,
        "sweep_fit_seconds": sum(m["fit_seconds"] for m in members),
        "cache_build_seconds": sum(m.get("feedback_cache/train_build_seconds", 0.0) for m in members)
        + sum(m.get("feedback_cache/val_build_seconds", 0.0) for m in members),
        "caches_built": sum(m.get("feedback_cache/train_built", 0.0) for m in members),
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }
    result["ratio_wall"] = result["sweep_wall_seconds"] / plain
    result["ratio_compute"] = (result["sweep_fit_seconds"] + result["cache_build_seconds"]) / plain_fit
    result["uncached_estimate_ratio"] = float(len(members))  # 8 plain runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
