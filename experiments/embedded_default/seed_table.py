"""The core issue's routing figures for every job of one or more stage-4 multiruns (e.g. seeds).

    python experiments/embedded_default/seed_table.py workspace/multirun/<dir> [...] [--reference EVAL_DIR]

Each job must have evaluated its router (``experiment=ablations`` writes ``<job>/eval/metrics.json``).
Per job: accuracy, the share of glance questions routed to one of the two coarsest levels, the share of
gaze questions routed to the finest level, the mean visual tokens (LLaVA-NeXT packing: global view +
unpadded local map + newlines) and their reduction against the full count, and whether every figure holds:
glance >= 90% coarse, gaze >= 90% finest, >= 50% fewer tokens, accuracy within 1 point of the finest fixed
level. The finest fixed level's accuracy comes from ``--reference`` (an evaluation with its fixed levels,
by default the workspace's latest ``runs/eval/<time>/``, i.e. the demo's).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def routing_figures(metrics: dict, finest_accuracy: float) -> dict:
    """The issue's figures of one evaluation (shares and points in %)."""
    levels = [str(g) for g in metrics["granularities"]]
    by_type = metrics["granularity_histogram_by_type"]
    glance, gaze = by_type["glance"], by_type["gaze"]
    coarse = 100 * sum(glance.get(g, 0) for g in levels[:2]) / sum(glance.values())
    finest = 100 * gaze.get(levels[-1], 0) / sum(gaze.values())
    accuracy = 100 * metrics["accuracy"]
    saved = 100 * metrics["token_reduction"]
    return {
        "accuracy": accuracy,
        "glance_coarse": coarse,
        "gaze_finest": finest,
        "visual_tokens": metrics["visual_tokens_mean"],
        "saved": saved,
        "met": coarse >= 90 and finest >= 90 and saved >= 50 and accuracy >= finest_accuracy - 1,
    }


def main() -> None:
    """Prints one markdown row per job and the count of jobs meeting every figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("multiruns", nargs="+", type=Path)
    parser.add_argument("--reference", type=Path, default=None, help="an eval run dir with fixed levels")
    args = parser.parse_args()
    reference = args.reference or sorted(Path("workspace/runs/eval").glob("2*"))[-1]
    fixed = json.loads((reference / "metrics.json").read_text())["fixed_levels"]
    finest = 100 * fixed[max(fixed, key=lambda name: int(name.split("@")[1]))]["accuracy"]
    print(f"finest fixed level: {finest:.1f}% ({reference})\n")
    print("| job | overrides | accuracy | glance to 2 coarsest | gaze to finest | visual tokens | all |")
    print("|---|---|---|---|---|---|---|")
    met = total = 0
    for multirun in args.multiruns:
        jobs = [p for p in multirun.iterdir() if (p / "eval/metrics.json").exists()]
        for job in sorted(jobs, key=lambda p: int(p.name) if p.name.isdigit() else p.name):
            f = routing_figures(json.loads((job / "eval/metrics.json").read_text()), finest)
            overrides = " ".join(yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
            print(
                f"| {multirun.name}/{job.name} | {overrides} | {f['accuracy']:.1f} | "
                f"{f['glance_coarse']:.1f}% | {f['gaze_finest']:.1f}% | "
                f"{f['visual_tokens']:.1f} (-{f['saved']:.1f}%) | {'met' if f['met'] else 'no'} |"
            )
            met, total = met + f["met"], total + 1
    print(f"\n{met} of {total} jobs meet every figure")


if __name__ == "__main__":
    main()
