"""Evaluation records -> metrics.json fields, a printed table and the routing figure (Fig. 5)."""

from __future__ import annotations

from collections import Counter, defaultdict
from statistics import mean, median

TOKEN_NOTE = (
    "visual_tokens: tokens fed to the LLM's first layer per sample: global view + unpadded local map + one "
    "image_newline per row (LLaVA-NeXT packing); 'full' is the same image at the finest granularity. "
    "visual_tokens_per_grid: tokens per tile grid at the chosen granularity (one 'grid' = one tile, before "
    "unpad, newlines excluded), the paper's Table 3 figure; per_grid_kept = its mean / the finest grid"
)
LATENCY_NOTE = (
    "milliseconds per sample at batch size 1 (each sample generated alone, after one untimed warm-up pass "
    "per selector), medians over the first stage.latency_samples test samples of each selector: "
    "vision_projector = vision tower + projector; selection = scaler + router + packing; prefill = prompt "
    "pass to the first token; decode = later tokens; total = their sum. Accuracy comes from a separate "
    "pass at stage.eval_batch_size with left padding. On several ranks only rank 0 times, over its own first "
    "samples (every other figure covers all ranks' samples)"
)
PHASES = ("vision_projector", "selection", "prefill", "decode", "total")


def summarize(records: list[dict], granularities: list[int]) -> dict:
    """Aggregates per-sample records of one selector.

    Args:
        records: dicts with correct, question_type, level, granularity, visual_tokens, visual_tokens_full,
            latency_ms (phase -> ms, or None for a sample that was not timed at batch size 1).
        granularities: tokens per tile of each level (histogram keys).
    """
    if not records:
        raise ValueError("no evaluation samples: the test split is empty or every sample was skipped")
    by_type: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_type[r["question_type"]].append(r["correct"])
    levels = Counter(r["level"] for r in records)
    hist_by_type: dict[str, dict[str, int]] = {}
    for qtype in by_type:
        counts = Counter(r["level"] for r in records if r["question_type"] == qtype)
        hist_by_type[qtype] = {str(g): counts.get(i, 0) for i, g in enumerate(granularities)}
    tokens = mean(r["visual_tokens"] for r in records)
    full = mean(r["visual_tokens_full"] for r in records)
    with_image = [r["granularity"] for r in records if r["level"] >= 0]
    per_grid = mean(with_image) if with_image else None  # None: no level chosen (text-only, FocusLLaVA)
    timed = [r for r in records if r.get("latency_ms")]
    same = [r["prediction_batch1"] == r["prediction"] for r in timed if "prediction_batch1" in r]
    return {
        "samples": len(records),
        "accuracy": mean(r["correct"] for r in records),
        "accuracy_by_type": {t: mean(v) for t, v in sorted(by_type.items())},
        "visual_tokens_mean": tokens,
        "visual_tokens_full_mean": full,
        "token_reduction": 1 - tokens / full if full else 0.0,
        "visual_tokens_per_grid_mean": per_grid,
        "per_grid_kept": per_grid / granularities[-1] if with_image else None,
        "granularity_histogram": {str(g): levels.get(i, 0) for i, g in enumerate(granularities)},
        "granularity_histogram_by_type": hist_by_type,
        "latency_ms": {p: median(r["latency_ms"][p] for r in timed) for p in PHASES} if timed else {},
        "latency_samples": len(timed),
        # batch-size-1 predictions of the timed samples equal to the batched ones (1.0 expected)
        "batch1_agreement": mean(same) if same else None,
    }


def score_in_percent(metric: str) -> bool:
    """Whether a benchmark metric is a share (shown in percent, as accuracy); MME's is a point score."""
    return metric != "mme"


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per selector (routed and fixed levels), each column's unit in its header.

    Shares (accuracy, a share-valued benchmark metric, tokens vs full) are percent; MME's score is
    its own points; ``per grid`` is "n/a" for a selector that chooses no level (FocusLLaVA's samplers).
    """
    types = sorted({t for m in results.values() for t in m["accuracy_by_type"]})
    bench = next(iter(results.values())).get("benchmark")
    percent = bench is not None and score_in_percent(bench["metric"])
    score_head = [f"{bench['metric']} ({'%' if percent else 'points'})"] if bench else []
    head = [
        "selector", "accuracy (%)", *score_head, *[f"acc {t} (%)" for t in types], "visual tokens (mean)",
        "vs full (%)", "per grid (tokens, % of finest)", "latency ms (bs 1)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        latency = m["latency_ms"].get("total")
        score = m["benchmark"]["score"] if bench else None
        per_grid = m["visual_tokens_per_grid_mean"]
        row = [
            name,
            f"{100 * m['accuracy']:.1f}",
            *([f"{100 * score:.1f}" if percent else f"{score:.4g}"] if bench else []),
            *[f"{100 * m['accuracy_by_type'].get(t, float('nan')):.1f}" for t in types],
            f"{m['visual_tokens_mean']:.1f}",
            f"{100 * (1 - m['token_reduction']):.1f}",
            "n/a" if per_grid is None else f"{per_grid:.1f} ({100 * m['per_grid_kept']:.1f}%)",
            "-" if latency is None else f"{latency:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def routed_any(hist_by_type: dict[str, dict[str, int]]) -> bool:
    """Whether any sample chose a granularity (FocusLLaVA's samplers and text-only sets choose none)."""
    return any(n for counts in hist_by_type.values() for n in counts.values())


def histogram_figure(hist_by_type: dict[str, dict[str, int]], title: str):
    """The paper's Fig. 5: share of samples per granularity, one bar group per question type.

    Question types and the title are user text: they are drawn as plain text (no mathtext, no TeX),
    so a ``$`` in them is a dollar sign, never a parse error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Texts take these settings when they are created, so the figure keeps them when saved later.
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
        fig, ax = plt.subplots(figsize=(6, 3.2))
        types = sorted(hist_by_type)
        levels = list(next(iter(hist_by_type.values())).keys()) if hist_by_type else []
        width = 0.8 / max(1, len(types))
        bars = []
        for i, qtype in enumerate(types):
            counts = hist_by_type[qtype]
            total = max(1, sum(counts.values()))
            shares = [counts[g] / total for g in levels]
            bars.append(ax.bar([x + i * width for x in range(len(levels))], shares, width))
        ax.set_xticks([x + width * (len(types) - 1) / 2 for x in range(len(levels))], levels)
        ax.set_xlabel("granularity (visual tokens per tile)")
        ax.set_ylabel("share of samples")
        ax.set_title(title)
        ax.legend(bars, types)  # given explicitly: an auto legend hides labels that start with "_"
        fig.tight_layout()
    return fig
