"""``python -m avglab.tools.report <multirun dir> [...] --out experiments/ablations``: tables and figures.

Collects the evaluation metrics.json files of one or more multiruns (Table 4 rows, k / alpha /
token-cost sweeps), refuses to mix base checkpoints or data sets, and writes:
- ``tables.md``: Table 4 (ablations), Table 3 (tokens kept and speed per question type), the
  sweep tables and the routing of every run (share of each question type at each granularity);
- ``fig5_routing.png`` (routing proportions of the full row per question type), ``fig6_k.png``,
  ``fig7_alpha.png``, ``pareto_token_cost.png``, ``pareto_prefill_flops.png`` (accuracy against prefill
  FLOPs of every evaluated mode: each run, its fixed levels and its training-free reductions);
- ``runs.json`` (what was collected) and TensorBoard events in ``tensorboard/`` (figures, tables as
  text, sweep scalars).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from avglab.eval.paper_tables import (
    ROWS,
    MixedRunsError,
    Run,
    collect,
    first_runs,
    repeats_note,
    routing_table,
    sweep_runs,
    sweep_table,
    table3,
    table4,
)
from avglab.eval.summary import histogram_figure
from avglab.eval.sweep_figures import pareto_figure, sweep_figure
from avglab.reduce.report import format_cost_table
from avglab.reduce.report import pareto_figure as flops_pareto_figure

SWEEP_FIGURES = {  # sweep -> (file, title, log x)
    "k": ("fig6_k.png", "Fig. 6: instruction tokens kept (k)", False),
    "alpha": ("fig7_alpha.png", "Fig. 7: CE weight alpha", False),
    "token_cost": ("pareto_token_cost.png", "", False),
}


def write_report(folders: list[Path], out: Path, tensorboard: bool = True) -> dict:
    """Writes tables, figures and TensorBoard events; returns what it wrote.

    Raises:
        MixedRunsError: the runs come from different base checkpoints or data sets.
        FileNotFoundError: no evaluation metrics.json below ``folders``.
    """
    runs, identity = collect(folders)
    out.mkdir(parents=True, exist_ok=True)
    sections = [
        f"Base checkpoint `{identity['base_path']}` (sha256 {identity['base_sha256'][:16]}), data "
        f"`{identity['data']}` (test shards sha256 {identity['test_sha256'][:16]}); {len(runs)} runs.",
        "### Table 4: ablations\n\n" + table4(runs),
        "### Table 3: visual tokens kept and speed (AVG-LLaVA vs fixed finest granularity)\n\n"
        + table3(runs),
    ]
    figures = {}
    full = next((r for r in runs if r.ablation == "full"), None)
    if full is not None:
        figures["fig5_routing.png"] = histogram_figure(
            full.metrics["granularity_histogram_by_type"], "Fig. 5: granularity chosen (AVG-LLaVA)"
        )
    sweeps = {}
    for name, (file, title, log_x) in SWEEP_FIGURES.items():
        groups = sweep_runs(runs, name)
        points = first_runs(groups)
        if len(points) < 2:
            continue
        sweeps[name] = points
        note = repeats_note(groups, name)
        scale = (
            f" (router.token_cost_scale={points[0][1].params['token_cost_scale']})"
            if name == "token_cost"
            else ""
        )
        sections.append(
            f"### sweep: {name}{scale}\n\n" + sweep_table(points, name) + (f"\n\n{note}" if note else "")
        )
        if name == "token_cost":
            refs = [r for r in runs if r.ablation in ("fixed", "random")]
            figures[file] = pareto_figure(points, refs)
        else:
            figures[file] = sweep_figure(points, name, title, log_x)
    costs = cost_points(runs)
    if len(costs) > 1:
        sections.append(
            "### Accuracy against prefill FLOPs (every evaluated mode, FLOPs relative to the finest)\n\n"
            + format_cost_table(costs)
        )
        figures["pareto_prefill_flops.png"] = flops_pareto_figure(costs, "accuracy vs prefill FLOPs")
    sections.append(
        "### Routing: share of each question type's samples at each granularity (coarsest first)\n\n"
        + routing_table(routing_rows(runs, sweeps))
    )
    text = "\n\n".join(sections) + "\n"
    (out / "tables.md").write_text(text)
    for file, fig in figures.items():
        fig.savefig(out / file, dpi=100)
    summary = [
        {
            "path": str(r.path),
            "ablation": r.ablation,
            "stage": r.stage,
            "router": r.router,
            **r.params,
            "accuracy": r.metrics["accuracy"],
            "visual_tokens_mean": r.metrics["visual_tokens_mean"],
            "granularity_histogram_by_type": r.metrics["granularity_histogram_by_type"],
        }
        for r in runs
    ]
    (out / "runs.json").write_text(json.dumps({"identity": identity, "runs": summary}, indent=1))
    if tensorboard:
        log_tensorboard(out / "tensorboard", text, figures, sweeps)
    return {"tables": out / "tables.md", "figures": sorted(figures), "runs": len(runs)}


def cost_points(runs: list[Run]) -> dict[str, dict]:
    """Every evaluated mode with prefill FLOPs: each run's own row, its fixed levels and its reductions.

    A run is named by its Table 4 row, else its folder; a fixed level or reduction by its mode. A mode that
    several runs scored alike is one point; one scored differently (another base model, another seed) gets
    the run's folder added to its name.
    """
    points: dict[str, dict] = {}
    for run in runs:
        label = ROWS.get(run.ablation) or run.path.name
        modes = [(label, run.metrics)]
        for group in ("fixed_levels", "reductions"):
            modes += list((run.metrics.get(group) or {}).items())
        for name, metrics in modes:
            if metrics.get("prefill_flops_relative") is None:
                continue
            if name in points:
                if _same_point(points[name], metrics):
                    continue
                name = f"{name} [{run.path.name}]"
            points[name] = metrics
    return points


def _same_point(a: dict, b: dict) -> bool:
    """Same accuracy and prefill FLOPs."""
    return a["accuracy"] == b["accuracy"] and a["prefill_flops_relative"] == b["prefill_flops_relative"]


def routing_rows(runs: list[Run], sweeps: dict) -> list[tuple[str, Run]]:
    """Table 4 rows in the paper's order, then each sweep's members (the full row listed once)."""
    by_ablation = {r.ablation: r for r in runs if r.ablation in ROWS}
    rows = [(label, by_ablation[name]) for name, label in ROWS.items() if name in by_ablation]
    for name, points in sweeps.items():
        rows += [(f"{name}={value}", run) for value, run in points if run.ablation != "full"]
    return rows


def log_tensorboard(folder: Path, text: str, figures: dict, sweeps: dict) -> None:
    """Tables as text, figures as images, sweep accuracies as scalars (step = index in the sweep).

    The report is rewritten as a whole, so earlier report events in ``folder`` are removed first:
    TensorBoard would otherwise show the stale tables and sweep curves beside the new ones.
    """
    from torch.utils.tensorboard import SummaryWriter

    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(folder))
    writer.add_text("report/tables", text)
    for file, fig in figures.items():
        writer.add_figure(f"report/{Path(file).stem}", fig)
    for name, points in sweeps.items():
        for step, (value, run) in enumerate(points):
            writer.add_scalar(f"sweep_{name}/value", float(value), step)
            writer.add_scalar(f"sweep_{name}/accuracy", run.metrics["accuracy"], step)
            writer.add_scalar(f"sweep_{name}/visual_tokens_mean", run.metrics["visual_tokens_mean"], step)
    writer.close()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 on mixed or missing runs)."""
    parser = argparse.ArgumentParser(prog="python -m avglab.tools.report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="multirun (or run) folders to collect")
    parser.add_argument("--out", type=Path, default=Path("experiments/ablations"), help="output folder")
    parser.add_argument("--no-tensorboard", action="store_true", help="skip the TensorBoard events")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folders, args.out, tensorboard=not args.no_tensorboard)
    except (MixedRunsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((args.out / "tables.md").read_text())
    print(f"wrote {written['tables']} and {written['figures']} from {written['runs']} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
