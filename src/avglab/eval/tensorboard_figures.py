"""Figures for TensorBoard's Images tab: accuracy against cost per selector, and a grid of answered samples.

Both take plain records (``summarize``'s results, ``EvalStage.answer``'s per-sample dicts), so the
evaluation (test samples) and stage 4 (validation samples) draw them the same way.
"""

from __future__ import annotations

import textwrap

import numpy as np

COST_AXES = (  # (results key, x-axis label); a key no result has is left out
    ("visual_tokens_mean", "visual tokens per sample (mean)"),
    ("prefill_flops_relative", "LLM prefill FLOPs vs the finest level"),
)


def _pyplot():
    """Matplotlib and pyplot on the Agg backend (figures are rendered to images, never shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return matplotlib, plt


def tokens_accuracy_figure(results: dict[str, dict], routed: str):
    """Accuracy against visual tokens (and relative prefill FLOPs when known), one point per selector.

    Args:
        results: selector name -> its ``summarize`` figures (``accuracy``, ``visual_tokens_mean``,
            optionally ``prefill_flops_relative``).
        routed: the configured selector's name; its point is drawn as a red star.

    Returns:
        A matplotlib figure with one panel per cost axis.
    """
    matplotlib, plt = _pyplot()
    axes_keys = [(k, label) for k, label in COST_AXES if all(r.get(k) is not None for r in results.values())]
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):  # names are plain text
        fig, axes = plt.subplots(1, len(axes_keys), figsize=(5.2 * len(axes_keys), 3.6), squeeze=False)
        for ax, (key, label) in zip(axes[0], axes_keys, strict=True):
            for i, (name, m) in enumerate(results.items()):
                mine = name == routed
                x, y = m[key], 100 * m["accuracy"]
                ax.scatter(
                    x, y, marker="*" if mine else "o", s=180 if mine else 40, c="red" if mine else "C0"
                )
                above = 4 if i % 2 == 0 else -11  # neighbours' labels alternate above and below the points
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, above), fontsize=8)
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy (%)")
            ax.grid(alpha=0.3)
        fig.suptitle(f"accuracy vs cost per selector (star: {routed})")
        fig.tight_layout()
    return fig


def pick_per_type(types: list[str], counts: dict[str, int], per_type: int) -> list[int]:
    """Indices of a batch's samples still needed for ``per_type`` samples of each question type.

    Args:
        types: the batch's question types, in order.
        counts: samples taken so far per type; updated in place.
        per_type: samples wanted per type.
    """
    picked = []
    for i, qtype in enumerate(types):
        if counts.get(qtype, 0) < per_type:
            counts[qtype] = counts.get(qtype, 0) + 1
            picked.append(i)
    return picked


def thumbnail(pixel_values, mean, std) -> np.ndarray:
    """The global view of one sample's tiles as an RGB image in [0, 1].

    Args:
        pixel_values: (T, 3, S, S) normalised tiles; tile 0 is LLaVA-NeXT's whole-image view.
        mean: per-channel mean of the normalisation (3 values).
        std: per-channel standard deviation (3 values).

    Returns:
        (S, S, 3) float array.
    """
    view = pixel_values[0].detach().float().cpu().numpy()
    view = view * np.asarray(std)[:, None, None] + np.asarray(mean)[:, None, None]
    return np.clip(view.transpose(1, 2, 0), 0.0, 1.0)


def sample_grid_figure(samples: list[dict], title: str):
    """One panel per sample: its image, question, chosen granularity, answer and whether it is right.

    Rows are question types, so the router's choice can be compared within a type and across them.

    Args:
        samples: dicts with ``image`` ((H, W, 3) array in [0, 1], or None for a text-only sample),
            ``question``, ``question_type``, ``granularity`` (tokens per tile, 0: no level chosen),
            ``prediction``, ``answers`` and ``correct``.
        title: the figure's title.
    """
    matplotlib, plt = _pyplot()
    types = sorted({s["question_type"] for s in samples})
    rows = [[s for s in samples if s["question_type"] == t] for t in types]
    cols = max(len(r) for r in rows)
    with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):  # user text stays text
        fig, axes = plt.subplots(len(rows), cols, figsize=(2.9 * cols, 3.3 * len(rows)), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for r, row in enumerate(rows):
            for c, s in enumerate(row):
                ax = axes[r][c]
                if s["image"] is not None:
                    ax.imshow(s["image"])
                mark = "right" if s["correct"] else "wrong"
                level = f"{s['granularity']} tok/tile" if s["granularity"] else "no level"
                text = [
                    f"[{s['question_type']}] {level}",
                    *textwrap.wrap(f"Q: {s['question']}", 34)[:3],
                    f"A: {s['prediction'] or '(empty)'}"[:34],
                    f"ref: {' | '.join(s['answers'])}"[:34],
                    mark,
                ]
                ax.set_title("\n".join(text), fontsize=7.5, color="green" if s["correct"] else "red")
        fig.suptitle(title)
        fig.tight_layout()
    return fig
