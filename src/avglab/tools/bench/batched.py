"""Routed generation in batches and throughput (``stage.batch_mixed`` in ``stage=bench``).

The paper evaluates one image per call; lmms-eval and servers run batches in which every sample picks
its own level. Two ways to feed such a batch, both timed beside HF ``generate`` and avglab at full
granularity on the same left-padded batch of mixed image sizes:

- ``avglab_routed``: one left-padded batch, each sample at its own level. The prefill then runs every
  row to the longest prompt, so one sample routed to the finest level sets the cost of all.
- ``avglab_routed_grouped``: the batch is routed once, then split into sub-batches of one level each,
  generated one after the other. Padding stays within a level (image sizes still differ); the price
  is one decoding loop per level.

Throughput is samples (and visual tokens) per second over the batch's end to end at n new tokens. Its
bound for a routed mode is the FLOP ratio of the two prompt sets, sum_i F(full_i) / sum_i F(routed_i),
with F the analytic prefill FLOPs of each sample's unpadded prompt (``avglab.tools.bench.flops``).
"""

from __future__ import annotations

from statistics import median

import torch

from avglab.core.generation import greedy_generate
from avglab.core.model import AvgCore
from avglab.tools.bench.flops import prefill_flops
from avglab.tools.bench.timing import now

THROUGHPUT_BOUND_MIN = 0.8  # routed / full throughput as a fraction of the FLOP-ratio bound


@torch.no_grad()
def routed_grouped_run(core: AvgCore, batch: dict, max_new_tokens: int) -> dict:
    """One routed batch generated in sub-batches of one level each, timed like ``avglab_run``.

    Returns:
        The keys of ``timing.avglab_run``: ``ttft`` is the time until every sub-batch has its first
        token (vision, routing, then each sub-batch's pack, splice and prefill) and ``step_ms[j]`` the
        sum over sub-batches of their (j+2)-th token, so ``ttft + sum(step_ms[:n-1])`` is the batch's
        end to end at n tokens. ``tokens`` are in the batch's row order.
    """
    device = core.llava.device
    start = now(device)
    tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    t_vision = now(device)
    encoded = core.pyramid(tiles, owner, batch["has_image"])
    levels = core.select(encoded, batch)[0]
    t_select = now(device)
    pack_ms = prefill_ms = 0.0
    step_ms = [0.0] * (max_new_tokens - 1)
    tokens: list[list[int] | None] = [None] * len(levels)
    visual_tokens = [0] * len(levels)
    llm_tokens = [0] * len(levels)
    for level in sorted(set(levels.tolist())):
        rows = (levels == level).nonzero()[:, 0]
        t0 = now(device)
        visual = core.pack(encoded.rows(rows), batch["image_sizes"][rows], levels[rows])
        ids, mask = batch["prompt_input_ids"][rows], batch["prompt_attention_mask"][rows]
        prompt = core.splice(ids, mask, visual, padding_side="left")
        pack_ms += (now(device) - t0) * 1e3
        steps: list[float] = []
        generated = greedy_generate(core, prompt, max_new_tokens, eos_token_id=-1, step_ms=steps)
        prefill_ms += generated.prefill_ms
        step_ms = [a + b for a, b in zip(step_ms, steps, strict=True)]
        lengths = prompt.attention_mask.sum(1).tolist()
        for j, row in enumerate(rows.tolist()):
            tokens[row] = generated.tokens[j].tolist()
            visual_tokens[row] = 0 if visual[j] is None else len(visual[j])
            llm_tokens[row] = int(lengths[j])
    select_ms = (t_select - t_vision) * 1e3
    return {
        "vision_projector": (t_vision - start) * 1e3,
        "scaler_router": select_ms,
        "pack_splice": pack_ms,
        "prefill": prefill_ms,
        "ttft": (t_select - start) * 1e3 + pack_ms + prefill_ms,
        "step_ms": step_ms,
        "level": int(levels[0]),
        "visual_tokens": visual_tokens[0],
        "llm_tokens": llm_tokens[0],
        "batch_visual_tokens": sum(visual_tokens),
        "batch_levels": levels.tolist(),
        "sample_llm_tokens": llm_tokens,
        "tokens": tokens,
        "prompt": None,
    }


def add_throughput(
    core: AvgCore, table: dict, samples: dict[str, list[dict]], labels: dict[str, str]
) -> None:
    """Adds samples/s, visual tokens/s and (routed modes) the FLOP-ratio bound to a batched table.

    Args:
        core: the model core (its LLM config for the FLOPs).
        table: a ``summarize_bench`` table with ``batch_size`` and ``max_new_tokens`` set.
        samples: the kept runs per mode of that batch size.
        labels: mode -> table row name, for the modes of ``samples`` that have a row.
    """
    n, size = table["max_new_tokens"], table["batch_size"]
    text = core.config.text_config
    finest = f"level{core.scaler.num_levels - 1}"

    def e2e(run: dict) -> float:
        return run["ttft"] + sum(run["step_ms"][: n - 1])

    def prompt_flops(run: dict) -> float:  # the unpadded prompts of the batch
        return sum(prefill_flops(text, int(t)) for t in run["sample_llm_tokens"])

    full = samples[finest]
    full_flops = median(prompt_flops(r) for r in full)
    for mode, label in labels.items():
        runs, row = samples[mode], table["modes"][label]
        reference = full if mode == "hf_generate" else runs  # HF's batch holds avglab full's tokens
        row["batch_visual_tokens"] = median(r["batch_visual_tokens"] for r in reference)
        row["samples_per_s"] = median(size / e2e(r) * 1e3 for r in runs)
        row["visual_tokens_per_s"] = median(
            v["batch_visual_tokens"] / e2e(r) * 1e3 for r, v in zip(runs, reference, strict=True)
        )
        if mode.startswith("routed"):
            row["levels_per_batch"] = median(len(set(r["batch_levels"])) for r in runs)
            chosen = sorted({lv for r in runs for lv in r["batch_levels"]})
            row["batch_levels"] = [core.scaler.granularities[lv] for lv in chosen]  # tokens per tile
            row["flop_bound"] = full_flops / median(prompt_flops(r) for r in runs)
    full_rate = table["modes"][labels[finest]]["samples_per_s"]
    for label in labels.values():
        row = table["modes"][label]
        row["throughput_vs_full"] = row["samples_per_s"] / full_rate
        if "flop_bound" in row:
            row["throughput_vs_bound"] = row["throughput_vs_full"] / row["flop_bound"]
            table["targets"][f"{label}_throughput_vs_bound"] = {
                "value": row["throughput_vs_bound"],
                "pass": row["throughput_vs_bound"] >= THROUGHPUT_BOUND_MIN,
            }


def format_throughput(table: dict) -> str:
    """Markdown: throughput per mode of one batched table and the routed modes' bound."""
    head = ["mode", "visual tok / batch", "levels in batch", "samples/s", "visual tok/s", "vs full"]
    head += ["FLOP bound", "vs bound"]
    lines = [
        f"### throughput, batch size {table['batch_size']} (mixed image sizes), {table['max_new_tokens']} "
        "new tokens",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in table["modes"].items():
        if "samples_per_s" not in m:
            continue
        bound, versus = m.get("flop_bound"), m.get("throughput_vs_bound")
        levels = "/".join(str(lv) for lv in m.get("batch_levels", [])) or "-"
        lines.append(
            f"| {name} | {m['batch_visual_tokens']:.0f} | {levels} | {m['samples_per_s']:.3f} | "
            f"{m['visual_tokens_per_s']:.0f} | {m['throughput_vs_full']:.3f} | "
            f"{'-' if bound is None else f'{bound:.2f}'} | {'-' if versus is None else f'{versus:.3f}'} |"
        )
    checks = [f"{k}: {v['value']:.3f} (target >= {THROUGHPUT_BOUND_MIN}): {'PASS' if v['pass'] else 'FAIL'}"
              for k, v in table["targets"].items() if k.endswith("throughput_vs_bound")]  # fmt: skip
    return "\n".join(lines + [""] + [f"- {c}" for c in checks])
