"""``stage.compare_reduce`` in ``stage=bench``: each training-free reduction timed beside its FLOP bound.

At batch size 1 and the finest level (the plain LLaVA-NeXT the baselines are applied to), every repeat
runs the unreduced pipeline and then each reduction on the same inputs (interleaved, so drifts of a
shared machine hit all alike). The prefill speed-up over the unreduced run is set against the bound
the LLM's prefill FLOPs allow (``avglab.reduce.accounting``, the bench's count layer by layer); the
reduction's own work (FastV's one-layer attention, PruMerge+'s selection and merge) is inside the
measured time and outside the bound.
"""

from __future__ import annotations

from statistics import median

import torch
from omegaconf import ListConfig

from avglab.core.generation import greedy_generate
from avglab.reduce.accounting import layered_prefill_flops
from avglab.reduce.build import build_reductions
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.timing import avglab_run


def layer_counts(core, prompt) -> list[int]:
    """LLM input tokens per layer of the first sample of ``prompt`` (one untimed 1-token generation)."""
    generated = greedy_generate(core, prompt, 1, eos_token_id=-1)
    per_layer = getattr(generated, "visual_tokens_per_layer", None)
    length = int(prompt.attention_mask[0].sum())
    if per_layer is None:
        return [length] * core.config.text_config.num_hidden_layers
    visual = int(per_layer[0, 0])
    return [length - visual + int(v) for v in per_layer[0].tolist()]


@torch.no_grad()
def time_reductions(cfg, core, tokenizer, image_processor) -> dict:
    """Median prefill, decode per token and end to end per reduction, with speed-ups and FLOP bounds.

    Returns:
        ``{"modes": {label: row}, "settings": {label: settings}}``; the unreduced run is ``none``.
    """
    stage = cfg.stage
    depth = core.config.text_config.num_hidden_layers
    reductions = {"none": None, **build_reductions(stage.compare_reduce, depth)}
    batches = bench_inputs(cfg, tokenizer, image_processor, core.config.image_grid_pinpoints, 1)
    finest, n_new = core.scaler.num_levels - 1, stage.max_new_tokens
    n_new = max(int(x) for x in n_new) if isinstance(n_new, (list, tuple, ListConfig)) else int(n_new)
    configured, runs = core.reduction, {name: [] for name in reductions}
    tokens: dict[str, list[int]] = {}
    try:
        for rep in range(stage.warmup + stage.repeats):
            for batch in batches:
                for name, reduction in reductions.items():
                    core.reduction = reduction
                    out = avglab_run(core, batch, finest, n_new, route=False)
                    if name not in tokens:
                        tokens[name] = layer_counts(core, out["prompt"])
                    if rep >= stage.warmup:
                        runs[name].append(out)
    finally:
        core.reduction = configured
    text = core.config.text_config
    base_prefill = median(r["prefill"] for r in runs["none"])
    base_flops = layered_prefill_flops(text, tokens["none"])
    rows = {}
    for name, samples in runs.items():
        prefill = median(r["prefill"] for r in samples)
        flops = layered_prefill_flops(text, tokens[name])
        speedup, bound = base_prefill / prefill, base_flops / flops
        rows[name] = {
            "visual_tokens": samples[0]["visual_tokens"],
            "llm_tokens_per_layer": tokens[name],
            "prefill": prefill,
            "decode_per_token": median(sum(r["step_ms"]) / len(r["step_ms"]) for r in samples),
            "end_to_end": median(r["ttft"] + sum(r["step_ms"]) for r in samples),
            "prefill_flops_relative": flops / base_flops,
            "prefill_speedup": speedup,
            "flop_bound": bound,
            "efficiency": speedup / bound,
        }
    settings = {k: (r.settings() if r is not None else {"name": "none"}) for k, r in reductions.items()}
    return {
        "modes": rows,
        "settings": settings,
        "level": core.scaler.granularities[finest],
        "max_new_tokens": n_new,
    }


def format_reductions(result: dict) -> str:
    """Markdown: one row per reduction, prefill speed-up against its FLOP bound."""
    head = [
        "reduction", "visual tok (layer 1)", "LLM tok per layer", "prefill ms", "decode/tok ms", "e2e ms",
        "prefill FLOPs (%)", "prefill speedup", "FLOP bound", "efficiency",
    ]  # fmt: skip
    lines = [
        f"### training-free reductions at the finest level ({result['level']} per tile), batch size 1, "
        f"{result['max_new_tokens']} new tokens",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in result["modes"].items():
        per_layer = m["llm_tokens_per_layer"]
        shown = str(per_layer[0]) if len(set(per_layer)) == 1 else "/".join(str(t) for t in per_layer)
        row = [
            name, str(m["visual_tokens"]), shown, f"{m['prefill']:.1f}", f"{m['decode_per_token']:.2f}",
            f"{m['end_to_end']:.1f}", f"{100 * m['prefill_flops_relative']:.1f}",
            f"{m['prefill_speedup']:.2f}", f"{m['flop_bound']:.2f}", f"{m['efficiency']:.2f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
