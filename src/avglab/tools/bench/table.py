"""The benchmark's Markdown table and its pass/fail targets (issue 5's figures)."""

from __future__ import annotations

# full-granularity avglab vs HF generate (HF time / avglab time), routing share of end-to-end when the
# finest level is chosen, and prefill speedup per level as a fraction of the bare LLM's speedup
TARGETS = {"full_vs_hf_min": 0.97, "routing_share_max": 0.03, "pipeline_efficiency_min": 0.9}


def targets(result: dict) -> dict:
    """Each target's measured value and whether it is met."""
    modes = result["modes"]
    ratio = modes["hf_generate"]["end_to_end"] / modes["avglab_full"]["end_to_end"]
    share = modes["avglab_routed_full"]["routing_share"]
    levels = {k: v["pipeline_efficiency"] for k, v in modes.items() if "pipeline_efficiency" in v}
    worst = min(levels.values())
    return {
        "full_vs_hf": {"value": ratio, "pass": ratio >= TARGETS["full_vs_hf_min"]},
        "routing_share_when_finest": {"value": share, "pass": share <= TARGETS["routing_share_max"]},
        "pipeline_efficiency_worst_level": {
            "value": worst,
            "per_level": levels,
            "pass": worst >= TARGETS["pipeline_efficiency_min"],
        },
    }


def fmt(value, digits: int = 1) -> str:
    """A number, or '-' when the mode has no such phase."""
    return "-" if value is None else f"{value:.{digits}f}"


def format_bench(result: dict) -> str:
    """Markdown: one row per mode, then the targets."""
    head = [
        "mode", "visual tok", "LLM tok", "vision+proj", "scaler+router", "pack", "prefill", "TTFT",
        "decode/tok", "end-to-end", "prefill speedup", "bare-LLM speedup", "efficiency", "FLOP bound",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["modes"].items():
        row = [
            name, fmt(m.get("visual_tokens"), 0), fmt(m.get("llm_tokens"), 0), fmt(m.get("vision_projector")),
            fmt(m.get("scaler_router")), fmt(m.get("pack_splice")), fmt(m.get("prefill")), fmt(m.get("ttft")),
            fmt(m.get("decode_per_token")), fmt(m.get("end_to_end")), fmt(m.get("prefill_speedup"), 2),
            fmt(m.get("llm_speedup"), 2), fmt(m.get("pipeline_efficiency"), 2), fmt(m.get("flop_bound"), 2),
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    t = result["targets"]
    lines += [
        "",
        f"times in ms; {result['note']}",
        f"threads {result['threads']}, image {result['image_size']}, {result['max_new_tokens']} new tokens, "
        f"{result['repeats']} repeats x {result['inputs']} inputs, HF and avglab-full tokens identical: "
        f"{result['hf_same_tokens']}",
        f"- avglab full vs HF generate (HF e2e / avglab e2e): {t['full_vs_hf']['value']:.3f} "
        f"(target >= {TARGETS['full_vs_hf_min']}): {'PASS' if t['full_vs_hf']['pass'] else 'FAIL'}",
        f"- scaler+router share of e2e, finest chosen: {100 * t['routing_share_when_finest']['value']:.2f}% "
        f"(target <= {100 * TARGETS['routing_share_max']:.0f}%): "
        f"{'PASS' if t['routing_share_when_finest']['pass'] else 'FAIL'} (analytic router FLOPs / (router + "
        f"full prefill) FLOPs: {100 * result['router_flop_share']:.2f}%)",
        f"- worst prefill speedup / bare-LLM speedup: {t['pipeline_efficiency_worst_level']['value']:.3f} "
        f"(target >= {TARGETS['pipeline_efficiency_min']}): "
        f"{'PASS' if t['pipeline_efficiency_worst_level']['pass'] else 'FAIL'}",
    ]
    return "\n".join(lines)
