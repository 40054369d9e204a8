"""What an evaluation leaves: metrics.json, predictions.jsonl, figures, TensorBoard scalars, the printout."""

from __future__ import annotations

import json

from avglab.eval.summary import (
    LATENCY_NOTE,
    PHASES,
    TOKEN_NOTE,
    format_table,
    histogram_figure,
    routed_any,
    score_in_percent,
)
from avglab.reduce.report import format_cost_table, pareto_figure


def eval_scalars(name: str, m: dict) -> dict[str, float]:
    """TensorBoard scalars of a selector: accuracy, benchmark metric, tokens, routing shares, latency."""
    bench = m["benchmark"]
    out = {
        f"eval/{name}/accuracy": m["accuracy"],
        f"eval/{name}/{bench['metric']}": bench["score"],
        f"eval/{name}/visual_tokens_mean": m["visual_tokens_mean"],
        f"eval/{name}/visual_tokens_equivalent_mean": m["visual_tokens_equivalent_mean"],
        f"eval/{name}/text_only_samples": m["text_only_samples"],
    }
    if m["visual_tokens_per_grid_mean"] is not None:  # a selector that chooses no level has none
        out[f"eval/{name}/visual_tokens_per_grid_mean"] = m["visual_tokens_per_grid_mean"]
    out.update({f"eval/{name}/{bench['metric']}_{k}": v for k, v in bench["components"].items()})
    out.update({f"eval/{name}/accuracy_{t}": a for t, a in m["accuracy_by_type"].items()})
    total = max(1, sum(m["granularity_histogram"].values()))
    out.update({f"eval/{name}/share_{g}": n / total for g, n in m["granularity_histogram"].items()})
    latency = m["latency_ms"]
    out.update({f"eval/{name}/latency_ms_{p}": latency[p] for p in PHASES if p in latency})
    return out


def write_outputs(stage, main: dict, records: list[dict]) -> None:
    """metrics.json, predictions.jsonl, the figures, TensorBoard and the printout of an ``EvalStage``.

    Args:
        stage: the finished ``EvalStage`` (its ``results``, ``out_dir``, ``logger``, selector and reductions).
        main: the selector's metrics as ``metrics.json`` holds them.
        records: the selector's per-sample records (every rank's, gathered).
    """
    stage.out_dir.mkdir(parents=True, exist_ok=True)
    (stage.out_dir / "metrics.json").write_text(json.dumps(main, indent=2))
    with open(stage.out_dir / "predictions.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    fig = None
    if routed_any(main["granularity_histogram_by_type"]):  # no level chosen: no empty figure
        fig = histogram_figure(
            main["granularity_histogram_by_type"], f"granularity chosen by {stage.selector_name}"
        )
        fig.savefig(stage.out_dir / "granularity_histogram.png", dpi=100)
    pareto = None
    if stage.reductions or stage.core.reduction is not None:  # reduce=none alone: outputs as before
        pareto = pareto_figure(stage.results, "accuracy vs prefill FLOPs")
        pareto.savefig(stage.out_dir / "pareto.png", dpi=100)
    if stage.logger is not None:
        for name, m in stage.results.items():
            stage.logger.log_metrics(eval_scalars(name, m), step=0)
        if fig is not None:
            stage.logger.experiment.add_figure("eval/granularity_histogram", fig, global_step=0)
        if pareto is not None:
            stage.logger.experiment.add_figure("eval/pareto", pareto, global_step=0)
            key = "prefill_flops_relative"
            stage.logger.log_metrics({f"eval/{n}/{key}": r[key] for n, r in stage.results.items()}, step=0)
        stage.logger.experiment.flush()
    print(format_table(stage.results))
    if pareto is not None:
        print("cost per mode (visual tokens per LLM layer; the LLM's prefill FLOPs vs the finest level):")
        print(format_cost_table(stage.results))
    routing = main["granularity_histogram_by_type"]
    print(
        f"granularity histogram ({stage.selector_name}, by question type): "
        + (str(routing) if routed_any(routing) else "n/a (no granularity level is chosen)")
    )
    score = main["benchmark"]["score"]
    shown = f"{100 * score:.1f}%" if score_in_percent(stage.metric) else f"{score:.4g} points"
    print(f"{stage.metric}: {shown} ({main['benchmark']['counted']})")
    print(f"latency ({LATENCY_NOTE}; {main['latency_samples']} samples): {main['latency_ms']}")
    print(f"tokens: {TOKEN_NOTE}")
    print(
        "layer-weighted visual tokens (m - n + i*n/L; = first-layer count without in-LLM pruning): "
        + ", ".join(f"{k} {v['visual_tokens_equivalent_mean']:.1f}" for k, v in stage.results.items())
    )
