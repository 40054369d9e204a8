"""Per-sample cost records, their means, the cost table and the Pareto figure of an evaluation.

Every evaluated mode (selector, fixed levels, reductions, FocusLLaVA) gets the visual tokens each LLM
layer saw and its prefill FLOPs relative to the same prompts at the finest level, so methods that
prune inside the LLM and before it are compared on one axis.
"""

from __future__ import annotations

import torch

from avglab.reduce.accounting import layered_prefill_flops


def tokens_per_layer(generated, visual: list, depth: int) -> list[list[int]]:
    """Per sample, the visual tokens each of the ``depth`` LLM layers saw in the prefill.

    Read from the generation: ``visual_tokens_per_layer`` (avglab.reduce's in-LLM pruning), or
    FocusLLaVA's ``removed`` n and ``equivalent_tokens`` m - n + i n / L (which give its layer i);
    otherwise every layer saw the first-layer count.
    """
    first = [0 if v is None else len(v) for v in visual]
    given = getattr(generated, "visual_tokens_per_layer", None)
    if given is not None:
        return [[int(x) for x in row] for row in given.tolist()]
    removed, equivalent = getattr(generated, "removed", None), getattr(generated, "equivalent_tokens", None)
    rows = []
    for b, m in enumerate(first):
        n = int(removed[b]) if removed is not None else 0
        if n and equivalent is not None:
            layer = round((float(equivalent[b]) - (m - n)) * depth / n)
            rows.append([m] * layer + [m - n] * (depth - layer))
        else:
            rows.append([m] * depth)
    return rows


def cost_fields(
    text_config, prompt_mask: torch.Tensor, has_image: torch.Tensor, per_layer, full
) -> list[dict]:
    """Record fields per sample: visual tokens per layer, prefill FLOPs and those at the finest level.

    Args:
        text_config: the LLM's config.
        prompt_mask: (B, L) prompt attention mask (the ``<image>`` placeholder counts as one token).
        has_image: (B,) bool.
        per_layer: from ``tokens_per_layer``.
        full: (B,) first-layer visual tokens at the finest level.
    """
    out = []
    for b, row in enumerate(per_layer):
        text = int(prompt_mask[b].sum()) - int(
            bool(has_image[b])
        )  # the placeholder becomes the visual tokens
        ours = layered_prefill_flops(text_config, [text + v for v in row])
        finest = layered_prefill_flops(text_config, [text + int(full[b])] * len(row))
        out.append({"visual_tokens_per_layer": row, "prefill_flops": ours, "prefill_flops_full": finest})
    return out


def add_cost_means(results: dict[str, dict], records: dict[str, list[dict]]) -> None:
    """``visual_tokens_per_layer_mean`` and ``prefill_flops_relative`` (FLOPs summed / at the finest)."""
    for name, recs in records.items():
        if not recs or "prefill_flops" not in recs[0]:
            continue
        depth = len(recs[0]["visual_tokens_per_layer"])
        results[name]["visual_tokens_per_layer_mean"] = [
            sum(r["visual_tokens_per_layer"][j] for r in recs) / len(recs) for j in range(depth)
        ]
        results[name]["prefill_flops_relative"] = sum(r["prefill_flops"] for r in recs) / sum(
            r["prefill_flops_full"] for r in recs
        )


def format_cost_table(results: dict[str, dict]) -> str:
    """Markdown: accuracy, first-layer and layer-mean visual tokens, relative prefill FLOPs, per mode."""
    head = [
        "mode",
        "accuracy (%)",
        "visual tokens, layer 1",
        "visual tokens, mean over layers",
        "prefill FLOPs vs finest (%)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        per_layer = m.get("visual_tokens_per_layer_mean")
        if per_layer is None:
            continue
        row = [
            name,
            f"{100 * m['accuracy']:.1f}",
            f"{per_layer[0]:.1f}",
            f"{sum(per_layer) / len(per_layer):.1f}",
            f"{100 * m['prefill_flops_relative']:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other beats (FLOPs <= and accuracy >=, one of them strictly)."""
    front = []
    for i, (f, a) in enumerate(points):
        beaten = any((g <= f and b >= a) and (g < f or b > a) for j, (g, b) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def pareto_figure(results: dict[str, dict], title: str):
    """Accuracy against relative prefill FLOPs, one labelled point per mode; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, m in results.items() if "prefill_flops_relative" in m]
    points = [(100 * results[n]["prefill_flops_relative"], 100 * results[n]["accuracy"]) for n in names]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (x, y) in zip(names, points, strict=True):
        ax.scatter(x, y, s=30)
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((points[i] for i in pareto_front(points)), key=lambda p: p[0])
    if len(front) > 1:
        ax.plot(*zip(*front, strict=True), "k--", linewidth=0.8, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xlabel("prefill FLOPs vs finest level (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
