"""Figures of experiments/ablations: accuracy along a sweep (Figs. 6, 7) and the token-cost Pareto curve."""

from __future__ import annotations

from avglab.eval.paper_tables import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sweep_figure(points: list[tuple[float, Run]], name: str, title: str, log_x: bool = False):
    """Accuracy (overall and per question type) against a swept value (the paper's Figs. 6 and 7)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    xs = [v for v, _ in points]
    ax.plot(xs, [100 * r.metrics["accuracy"] for _, r in points], "o-", label="all")
    types = sorted({t for _, r in points for t in r.metrics["accuracy_by_type"]})
    for t in types:
        ax.plot(
            xs, [100 * r.metrics["accuracy_by_type"].get(t, float("nan")) for _, r in points], ".--", label=t
        )
    if log_x and all(x > 0 for x in xs):
        ax.set_xscale("log")
    ax.set_xlabel(name)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def pareto_figure(points: list[tuple[float, Run]], references: list[Run]):
    """Accuracy against visual tokens per sample along ``router.token_cost``, with reference runs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    xs = [r.metrics["visual_tokens_mean"] for _, r in points]
    ys = [100 * r.metrics["accuracy"] for _, r in points]
    ax.plot(xs, ys, "o-", label="RGLF, token_cost sweep")
    for (cost, _), x, y in zip(points, xs, ys, strict=True):
        ax.annotate(f"{cost:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    for r in references:
        ax.plot(r.metrics["visual_tokens_mean"], 100 * r.metrics["accuracy"], "s", label=r.label)
    ax.set_xlabel("visual tokens per sample (LLM first layer)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs visual tokens")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
