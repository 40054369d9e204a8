"""``python -m avglab stage=bench``: times HF generate and avglab's modes on the same weights and inputs.

Everything runs in one process. Modes are interleaved inside each repeat (at batch size 1: HF generate,
then per level avglab fixed at that level and HF's decoding loop on the same prompt, routed,
routed-but-finest, bare LLM per level) so slow drifts of a shared machine hit all modes alike; the
first ``stage.warmup`` repeats are discarded and every figure is the median over the remaining
repeats x inputs.

Every generating mode decodes ``stage.max_new_tokens`` tokens and records the time of each token, so
one table at that count and one per entry n of ``stage.tables_at`` read decode per token and end to end
over the first n tokens of the same runs (short answers are where the first decode steps matter).
``stage.batch_sizes`` adds tables for left-padded batches (HF generate vs avglab at full granularity on
the same batch).
"""

from __future__ import annotations

import json
import logging
import platform
from collections import defaultdict
from pathlib import Path
from statistics import mean, median

import torch
from omegaconf import ListConfig

from avglab.data.anyres import num_tiles
from avglab.data.rates import RateMeter
from avglab.tools.bench.batched import add_throughput, format_throughput, routed_grouped_run
from avglab.tools.bench.flops import prefill_flops, router_flops
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.reductions import format_reductions, time_reductions
from avglab.tools.bench.routers import format_routers, time_routers
from avglab.tools.bench.table import TARGETS, format_bench, targets
from avglab.tools.bench.timing import avglab_run, hf_embeds, hf_inputs, hf_run, hf_vision_run, llm_run

log = logging.getLogger(__name__)
BENCH_NOTE = (
    "ms per batch (per sample at batch size 1), medians over stage.repeats x stage.inputs after "
    "stage.warmup discarded repeats; modes interleaved within a repeat; every mode decodes the same "
    "number of tokens (no early eos) and each table reads its first n tokens. prefill = the LLM's prompt "
    "pass to the first token (TTFT minus vision and selection); decode/tok = mean time of tokens 2..n; "
    "HF decode/tok = HF generate's decoding loop at the same context (from pixels at full granularity, "
    "from avglab's spliced prompt at a coarser level); end-to-end = vision to the n-th token; llm = bare "
    "decoder stack + LM head on avglab's prompt of that level; FLOPs analytic (avglab.tools.bench.flops)"
)


def as_list(value) -> list[int]:
    """An int or a list of ints from the config, as a list."""
    return [int(v) for v in value] if isinstance(value, (list, tuple, ListConfig)) else [int(value)]


def check_bench(stage) -> None:
    """Fails on a bench config that cannot run, naming the key."""
    for key in ("repeats", "inputs"):
        if stage[key] < 1:
            raise ValueError(f"stage.{key}={stage[key]}: must be >= 1")
    decoded = max(as_list(stage["max_new_tokens"]))
    if decoded < 2:
        raise ValueError(f"stage.max_new_tokens={decoded}: must be >= 2 to time decoding")
    for n in as_list(stage.get("tables_at", [])):
        if not 2 <= n <= decoded:
            raise ValueError(f"stage.tables_at: {n} is not in [2, stage.max_new_tokens={decoded}]")
    sizes = as_list(stage.get("batch_sizes", [1]))
    if not sizes or min(sizes) < 1:
        raise ValueError(f"stage.batch_sizes={sizes}: every entry must be >= 1")
    if stage["warmup"] < 0:
        raise ValueError(f"stage.warmup={stage['warmup']}: must be >= 0")


def table_counts(stage) -> list[int]:
    """New-token counts with a table: ``stage.tables_at`` and ``stage.max_new_tokens``, ascending."""
    return sorted(set(as_list(stage.max_new_tokens) + as_list(stage.get("tables_at", []))))


def bench_modes(core, batch_size: int, mixed: bool = False) -> list[str]:
    """Modes in their interleaving order: every mode at batch size 1, HF vs avglab full when batched.

    With ``mixed`` (``stage.batch_mixed``) a batch also runs routed: one padded batch and by level.
    """
    finest = core.scaler.num_levels - 1
    modes = ["hf_generate", "hf_vision"]
    if batch_size > 1:
        return modes + [f"level{finest}"] + (["routed", "routed_grouped"] if mixed else [])
    for level in range(finest + 1):  # HF's loop on a level's prompt right after avglab's run of it
        modes += [f"level{level}"] + ([f"hf_level{level}"] if level < finest else [])
    return modes + ["routed", "routed_full"] + [f"llm{i}" for i in range(finest + 1)]


def run_bench(cfg, core, tokenizer, image_processor, run_dir: Path, fingerprint: dict) -> dict:
    """Runs the benchmark, prints the Markdown tables and writes ``bench.json`` into the run directory."""
    stage = cfg.stage
    check_bench(stage)
    if stage.threads:
        torch.set_num_threads(stage.threads)
    core.eval()
    counts = table_counts(stage)
    pad = tokenizer.pad_token_id
    tables, image_size = [], None
    for size in as_list(stage.get("batch_sizes", [1])):
        mixed = size > 1 and bool(stage.get("batch_mixed"))  # mixed sizes, routed batches
        pinpoints = core.config.image_grid_pinpoints
        batches = bench_inputs(cfg, tokenizer, image_processor, pinpoints, size, mixed)
        image_size = batches[0]["image_sizes"][0].tolist()
        samples, same = time_modes(core, batches, bench_modes(core, size, mixed), max(counts), pad, stage)
        for n in counts:
            table = summarize_bench(core, samples, n)
            table.update(batch_size=size, max_new_tokens=n, hf_same_tokens=same)
            table["targets"] = targets(table)
            if mixed:  # samples/s, visual tokens/s and the routed modes' FLOP-ratio bound
                rows = [m for m in samples if m != "hf_vision"]
                labels = {m: m if m.startswith("hf") else mode_label(core, m) for m in rows}
                add_throughput(core, table, samples, labels)
            tables.append(table)
    tiles = num_tiles(image_size, core.config.image_grid_pinpoints, core.tile_size)
    routing = router_flops(core.selector, tiles)
    full = prefill_flops(core.config.text_config, int(tables[0]["modes"]["avglab_full"]["llm_tokens"]))
    result = {
        "tables": tables,
        "router_flops": routing,
        # the share scaler+router can at best take of (router + full prefill): a floor for routing_share
        "router_flop_share": routing / (routing + full),
        "note": BENCH_NOTE,
        "hf_same_tokens": all(t["hf_same_tokens"] for t in tables),
        "granularities": core.scaler.granularities,
        "repeats": stage.repeats,
        "warmup": stage.warmup,
        "inputs": stage.inputs,
        "image_size": image_size,
        "max_new_tokens": counts,
        "batch_sizes": sorted({t["batch_size"] for t in tables}),
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "fingerprint": fingerprint,
        "target_thresholds": TARGETS,
    }
    if stage.get("compare_reduce"):  # training-free reductions (avglab.reduce) beside their FLOP bounds
        result["reductions"] = time_reductions(cfg, core, tokenizer, image_processor)
    if stage.get("compare_routers"):  # cheaper router variants, finest level fed, side by side
        result["routers"] = time_routers(cfg, core, tokenizer, image_processor, counts)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(format_bench(result))
    for table in tables:  # stage.batch_mixed: throughput and the routed batches' bound
        if any("samples_per_s" in m for m in table["modes"].values()):
            print(format_throughput(table))
    if "reductions" in result:
        print(format_reductions(result["reductions"]))
    if "routers" in result:
        print(format_routers(result["routers"]))
    return result


def time_modes(
    core, batches: list[dict], modes: list[str], n_new: int, pad: int, stage
) -> tuple[dict[str, list[dict]], bool]:
    """Every mode on every batch, repeats outermost.

    Returns:
        The kept runs per mode, in the same (repeat, input) order for every mode, and whether HF and
        avglab decoded the same ids (full pipeline and every level).
    """
    hf = [hf_inputs(core, b, pad) for b in batches]
    samples: dict[str, list[dict]] = defaultdict(list)
    same: list[bool] = []
    total, meter = stage.warmup + stage.repeats, RateMeter()
    meter.update(0, 0)  # the clock starts at the first repeat
    for rep in range(total):
        _, eta = meter.rates(rep, total)  # from the repeats done so far
        log.info("bench batch size %d, repeat %d/%d (%d modes x %d inputs; ETA %s)",
                 len(batches[0]["input_ids"]), rep + 1, total, len(modes), len(batches), eta)  # fmt: skip
        for b, batch in enumerate(batches):
            prompts: dict[int, object] = {}
            outs = {mode: measure(core, mode, batch, hf[b], n_new, pad, prompts) for mode in modes}
            if rep == 0:
                same.append(
                    outs["hf_generate"]["tokens"] == outs[f"level{core.scaler.num_levels - 1}"]["tokens"]
                )
                same += [
                    outs[m]["tokens"] == outs[m[3:]]["tokens"] for m in modes if m.startswith("hf_level")
                ]
            if rep >= stage.warmup:
                for mode, out in outs.items():
                    samples[mode].append(out)
        meter.update(rep + 1, len(batches))
    return samples, all(same)


def measure(core, mode: str, batch: dict, hf: dict, n_new: int, pad: int, prompts: dict) -> dict:
    """One timed run of ``mode``; caches avglab's prompt per level for the HF-loop and bare-LLM runs."""
    finest = core.scaler.num_levels - 1
    if mode == "hf_generate":
        return hf_run(core, hf, n_new, pad)
    if mode == "hf_vision":
        return {"vision_projector": hf_vision_run(core, hf)}
    if mode.startswith("hf_level"):
        return hf_run(core, hf_embeds(prompts[int(mode[8:])]), n_new, pad)
    if mode.startswith("llm"):
        return {"llm": llm_run(core, prompts[int(mode[3:])])}
    if mode == "routed_grouped":
        out = routed_grouped_run(core, batch, n_new)
    elif mode == "routed":
        out = avglab_run(core, batch, None, n_new, route=True)
    elif mode == "routed_full":
        out = avglab_run(core, batch, finest, n_new, route=True)
    else:
        level = int(mode[5:])
        out = avglab_run(core, batch, level, n_new, route=False)
        prompts[level] = out["prompt"]
    out.pop("prompt")
    return out


def mode_label(core, mode: str) -> str:
    """Table name of an avglab mode: avglab_full, avglab_fixed@<tokens per tile>, avglab_routed(_full)."""
    if mode == f"level{core.scaler.num_levels - 1}":
        return "avglab_full"
    if mode.startswith("level"):
        return f"avglab_fixed@{core.scaler.granularities[int(mode[5:])]}"
    return f"avglab_{mode}"  # avglab_routed, avglab_routed_full, avglab_routed_grouped


def decode_per_token(sample: dict, n: int) -> float:
    """Mean time of tokens 2..n of one run."""
    return mean(sample["step_ms"][: n - 1])


def end_to_end(sample: dict, n: int) -> float:
    """Start to the n-th token of one run."""
    return sample["ttft"] + sum(sample["step_ms"][: n - 1])


def summarize_bench(core, samples: dict[str, list[dict]], n: int) -> dict:
    """One table: medians per mode and phase at ``n`` new tokens.

    Every avglab row also holds HF's decoding loop at the same context (``hf_decode_per_token``) and,
    where the bare-LLM runs exist (batch size 1), speedups against full granularity and FLOP bounds.
    """

    def med(mode: str, key: str) -> float:
        return median(s[key] for s in samples[mode])

    def hf_reference(level: int) -> str:  # HF's decoding loop at the context of this level
        return "hf_generate" if level == finest else f"hf_level{level}"

    finest = core.scaler.num_levels - 1
    hf_runs = samples["hf_generate"]
    rows = {
        "hf_generate": {
            "vision_projector": med("hf_vision", "vision_projector"),
            "ttft": med("hf_generate", "ttft"),
            "decode_per_token": median(decode_per_token(s, n) for s in hf_runs),
            "end_to_end": median(end_to_end(s, n) for s in hf_runs),
            "visual_tokens": samples[f"level{finest}"][0]["visual_tokens"],
            "llm_tokens": samples[f"level{finest}"][0]["llm_tokens"],
        }
    }
    text = core.config.text_config
    bare = f"llm{finest}" in samples
    if bare:
        full_prefill, full_llm = med(f"level{finest}", "prefill"), med(f"llm{finest}", "llm")
        full_flops = prefill_flops(text, samples[f"level{finest}"][0]["llm_tokens"])
    phases = ("vision_projector", "scaler_router", "pack_splice", "prefill", "ttft")
    avglab_modes = [
        m
        for m in ([f"level{i}" for i in range(finest + 1)] + ["routed", "routed_full", "routed_grouped"])
        if m in samples
    ]
    for mode in avglab_modes:
        runs = samples[mode]
        row = {p: med(mode, p) for p in phases}
        row["decode_per_token"] = median(decode_per_token(s, n) for s in runs)
        row["end_to_end"] = median(end_to_end(s, n) for s in runs)
        # the same (repeat, input) run of HF's loop at the level this run fed the LLM (where it was run:
        # batched routed modes have no HF loop at their mixed levels)
        mixed_levels = len(set(runs[0].get("batch_levels", [0]))) > 1
        if all(hf_reference(s["level"]) in samples for s in runs) and not mixed_levels:
            row["hf_decode_per_token"] = median(
                decode_per_token(samples[hf_reference(s["level"])][j], n) for j, s in enumerate(runs)
            )
            row["decode_vs_hf"] = row["hf_decode_per_token"] / row["decode_per_token"]
        row["visual_tokens"] = median(s["visual_tokens"] for s in runs)
        row["llm_tokens"] = median(s["llm_tokens"] for s in runs)
        row["levels_chosen"] = sorted({s["level"] for s in runs})
        row["routing_share"] = row["scaler_router"] / row["end_to_end"]
        if mode.startswith("level") and bare:
            level = int(mode[5:])
            llm = med(f"llm{level}", "llm")
            flops = prefill_flops(text, int(row["llm_tokens"]))
            row.update(
                llm_forward=llm,
                prefill_flops=flops,
                prefill_speedup=full_prefill / row["prefill"],
                llm_speedup=full_llm / llm,
                flop_bound=full_flops / flops,
            )
            row["pipeline_efficiency"] = row["prefill_speedup"] / row["llm_speedup"]
        rows[mode_label(core, mode)] = row
    return {"modes": rows}
