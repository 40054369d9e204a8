"""The benchmark's Markdown tables and their pass/fail targets."""

from __future__ import annotations

# full-granularity avglab vs HF generate (HF time / avglab time) end to end and per decoded token, routing
# share of end-to-end when the finest level is chosen, and prefill speedup per level as a fraction of the
# bare LLM's speedup
TARGETS = {
    "full_vs_hf_min": 0.97,
    "decode_vs_hf_min": 0.97,
    "routing_share_max": 0.03,
    "pipeline_efficiency_min": 0.9,
}


def targets(table: dict) -> dict:
    """Each target's measured value in one table and whether it is met.

    Routing share and prefill efficiency only where the table has those modes (batch size 1).
    """
    modes = table["modes"]
    full, hf = modes["avglab_full"], modes["hf_generate"]
    ratio = hf["end_to_end"] / full["end_to_end"]
    decode = full["decode_vs_hf"]
    out = {
        "full_vs_hf": {"value": ratio, "pass": ratio >= TARGETS["full_vs_hf_min"]},
        "decode_vs_hf": {
            "value": decode,
            "per_mode": {k: v["decode_vs_hf"] for k, v in modes.items() if "decode_vs_hf" in v},
            "pass": decode >= TARGETS["decode_vs_hf_min"],
        },
    }
    if "avglab_routed_full" in modes:
        share = modes["avglab_routed_full"]["routing_share"]
        out["routing_share_when_finest"] = {"value": share, "pass": share <= TARGETS["routing_share_max"]}
    levels = {k: v["pipeline_efficiency"] for k, v in modes.items() if "pipeline_efficiency" in v}
    if levels:
        worst = min(levels.values())
        out["pipeline_efficiency_worst_level"] = {
            "value": worst,
            "per_level": levels,
            "pass": worst >= TARGETS["pipeline_efficiency_min"],
        }
    return out


def fmt(value, digits: int = 1) -> str:
    """A number, or '-' when the mode has no such phase."""
    return "-" if value is None else f"{value:.{digits}f}"


def passed(target: dict) -> str:
    """PASS or FAIL."""
    return "PASS" if target["pass"] else "FAIL"


def format_table(table: dict, router_flop_share: float) -> str:
    """Markdown of one (batch size, new tokens) table: one row per mode, then its targets."""
    head = [
        "mode", "visual tok", "LLM tok", "vision+proj", "scaler+router", "pack", "prefill", "TTFT",
        "decode/tok", "HF decode/tok", "decode HF/avglab", "end-to-end", "prefill speedup",
        "bare-LLM speedup", "efficiency", "FLOP bound",
    ]  # fmt: skip
    lines = [
        f"### batch size {table['batch_size']}, {table['max_new_tokens']} new tokens",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in table["modes"].items():
        row = [
            name, fmt(m.get("visual_tokens"), 0), fmt(m.get("llm_tokens"), 0), fmt(m.get("vision_projector")),
            fmt(m.get("scaler_router")), fmt(m.get("pack_splice")), fmt(m.get("prefill")), fmt(m.get("ttft")),
            fmt(m.get("decode_per_token")), fmt(m.get("hf_decode_per_token")), fmt(m.get("decode_vs_hf"), 3),
            fmt(m.get("end_to_end")), fmt(m.get("prefill_speedup"), 2), fmt(m.get("llm_speedup"), 2),
            fmt(m.get("pipeline_efficiency"), 2), fmt(m.get("flop_bound"), 2),
        ]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    t = table["targets"]
    worst = min(t["decode_vs_hf"]["per_mode"].items(), key=lambda kv: kv[1])
    lines += [
        "",
        f"HF and avglab tokens identical (full pipeline and every level): {table['hf_same_tokens']}",
        f"- avglab full vs HF generate end to end (HF / avglab): {t['full_vs_hf']['value']:.3f} "
        f"(target >= {TARGETS['full_vs_hf_min']}): {passed(t['full_vs_hf'])}",
        f"- avglab full vs HF generate per decoded token (HF / avglab): {t['decode_vs_hf']['value']:.3f} "
        f"(target >= {TARGETS['decode_vs_hf_min']}): {passed(t['decode_vs_hf'])}; lowest over modes: "
        f"{worst[1]:.3f} ({worst[0]})",
    ]
    if "routing_share_when_finest" in t:
        share = t["routing_share_when_finest"]
        lines.append(
            f"- scaler+router share of e2e, finest chosen: {100 * share['value']:.2f}% "
            f"(target <= {100 * TARGETS['routing_share_max']:.0f}%): {passed(share)} "
            f"(analytic router FLOPs / (router + full prefill) FLOPs: {100 * router_flop_share:.2f}%)"
        )
    if "pipeline_efficiency_worst_level" in t:
        efficiency = t["pipeline_efficiency_worst_level"]
        lines.append(
            f"- worst prefill speedup / bare-LLM speedup: {efficiency['value']:.3f} "
            f"(target >= {TARGETS['pipeline_efficiency_min']}): {passed(efficiency)}"
        )
    return "\n".join(lines)


def format_bench(result: dict) -> str:
    """Markdown: one table per (batch size, new tokens), then the run's settings."""
    parts = [format_table(table, result["router_flop_share"]) for table in result["tables"]]
    parts.append(
        f"times in ms; {result['note']}\nthreads {result['threads']}, image {result['image_size']}, "
        f"new tokens {result['max_new_tokens']}, batch sizes {result['batch_sizes']}, {result['repeats']} "
        f"repeats x {result['inputs']} inputs"
    )
    return "\n\n".join(parts)
