"""``python -m avglab stage=bench``: times HF generate and avglab's modes on the same weights and inputs.

Everything runs in one process at batch size 1. Modes are interleaved inside each repeat (HF, avglab
full, every fixed level, routed, routed-but-finest, bare LLM per level) so slow drifts of a shared
machine hit all modes alike; the first ``stage.warmup`` repeats are discarded and every figure is the
median over the remaining repeats x inputs.
"""

from __future__ import annotations

import json
import logging
import platform
from collections import defaultdict
from pathlib import Path
from statistics import median

import torch

from avglab.data.anyres import num_tiles
from avglab.tools.bench.flops import prefill_flops, router_flops
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.table import TARGETS, format_bench, targets
from avglab.tools.bench.timing import avglab_run, hf_inputs, hf_run, hf_vision_run, llm_run

log = logging.getLogger(__name__)
BENCH_NOTE = (
    "ms per sample at batch size 1, medians over stage.repeats x stage.inputs after stage.warmup discarded "
    "repeats; modes interleaved within a repeat. prefill = the LLM's prompt pass to the first token (TTFT "
    "minus vision and selection); decode_per_token = later steps / their count; end_to_end = vision to last "
    "token; llm = bare decoder stack + LM head on avglab's prompt of that level; FLOPs analytic "
    "(avglab.tools.bench.flops)"
)


def check_bench(stage) -> None:
    """Fails on a bench config that cannot run, naming the key."""
    for key in ("repeats", "inputs", "max_new_tokens"):
        if stage[key] < 1:
            raise ValueError(f"stage.{key}={stage[key]}: must be >= 1")
    if stage.max_new_tokens < 2:
        raise ValueError("stage.max_new_tokens must be >= 2 to time decoding")
    if stage.warmup < 0:
        raise ValueError(f"stage.warmup={stage.warmup}: must be >= 0")


def run_bench(cfg, core, tokenizer, image_processor, run_dir: Path, fingerprint: dict) -> dict:
    """Runs the benchmark, prints the Markdown table and writes ``bench.json`` into the run directory."""
    stage = cfg.stage
    check_bench(stage)
    if stage.threads:
        torch.set_num_threads(stage.threads)
    core.eval()
    n_new = stage.max_new_tokens
    finest = core.scaler.num_levels - 1
    batches = bench_inputs(cfg, tokenizer, image_processor, core.config.image_grid_pinpoints)
    hf = [hf_inputs(core, b) for b in batches]
    modes = ["hf_generate", "hf_ttft", "hf_vision"]
    modes += [f"level{i}" for i in range(finest + 1)] + ["routed", "routed_full"]
    modes += [f"llm{i}" for i in range(finest + 1)]
    samples: dict[str, list[dict]] = defaultdict(list)
    prompts: dict[tuple[int, int], object] = {}
    same_tokens: list[bool] = []
    for rep in range(stage.warmup + stage.repeats):
        log.info("bench repeat %d/%d", rep + 1, stage.warmup + stage.repeats)
        for b, batch in enumerate(batches):
            full_tokens = None
            for mode in modes:
                out = measure(core, mode, batch, hf[b], n_new, tokenizer.pad_token_id, prompts, b)
                if mode == f"level{finest}":
                    full_tokens = out["tokens"]
                if mode == "hf_generate" and rep == 0:
                    hf_tokens = out["tokens"]
                if rep >= stage.warmup:
                    samples[mode].append(out)
            if rep == 0:
                same_tokens.append(hf_tokens == full_tokens)
    result = summarize_bench(core, samples, n_new)
    size = batches[0]["image_sizes"][0].tolist()
    tiles = num_tiles(size, core.config.image_grid_pinpoints, core.tile_size)
    routing = router_flops(core.selector, tiles)
    full = result["modes"]["avglab_full"]["prefill_flops"]
    result.update(
        router_flops=routing,
        # the share scaler+router can at best take of (router + full prefill): a floor for routing_share
        router_flop_share=routing / (routing + full),
        note=BENCH_NOTE,
        hf_same_tokens=all(same_tokens),  # avglab at full granularity decodes exactly what HF generates
        granularities=core.scaler.granularities,
        repeats=stage.repeats,
        warmup=stage.warmup,
        inputs=stage.inputs,
        image_size=list(batches[0]["image_sizes"][0].tolist()),
        max_new_tokens=n_new,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        fingerprint=fingerprint,
    )
    result["targets"] = targets(result)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bench.json").write_text(json.dumps(result, indent=2))
    print(format_bench(result))
    return result


def measure(core, mode: str, batch: dict, hf: dict, n_new: int, pad: int, prompts: dict, b: int) -> dict:
    """One timed run of ``mode`` on input ``b``; caches avglab's prompt per level for the bare-LLM runs."""
    finest = core.scaler.num_levels - 1
    if mode == "hf_generate":
        return hf_run(core, hf, n_new, pad)
    if mode == "hf_ttft":
        return hf_run(core, hf, 1, pad)
    if mode == "hf_vision":
        return {"vision_projector": hf_vision_run(core, hf)}
    if mode.startswith("llm"):
        return {"llm": llm_run(core, prompts[(b, int(mode[3:]))])}
    if mode == "routed":
        out = avglab_run(core, batch, None, n_new, route=True)
    elif mode == "routed_full":
        out = avglab_run(core, batch, finest, n_new, route=True)
    else:
        level = int(mode[5:])
        out = avglab_run(core, batch, level, n_new, route=False)
        prompts[(b, level)] = out["prompt"]
    out.pop("prompt")
    return out


def mode_label(core, mode: str) -> str:
    """Table name of an avglab mode: avglab_full, avglab_fixed@<tokens per tile>, avglab_routed(_full)."""
    if mode == f"level{core.scaler.num_levels - 1}":
        return "avglab_full"
    if mode.startswith("level"):
        return f"avglab_fixed@{core.scaler.granularities[int(mode[5:])]}"
    return {"routed": "avglab_routed", "routed_full": "avglab_routed_full"}[mode]


def summarize_bench(core, samples: dict[str, list[dict]], n_new: int) -> dict:
    """Medians per mode and phase, speedups against full granularity and the FLOP bounds."""

    def med(mode: str, key: str) -> float:
        return median(s[key] for s in samples[mode])

    finest = core.scaler.num_levels - 1
    phases = ("vision_projector", "scaler_router", "pack_splice", "prefill", "ttft", "decode_per_token",
              "end_to_end")  # fmt: skip
    hf_e2e, hf_ttft = med("hf_generate", "end_to_end"), med("hf_ttft", "end_to_end")
    rows = {
        "hf_generate": {
            "vision_projector": med("hf_vision", "vision_projector"),
            "ttft": hf_ttft,
            "decode_per_token": (hf_e2e - hf_ttft) / (n_new - 1),
            "end_to_end": hf_e2e,
            "visual_tokens": samples[f"level{finest}"][0]["visual_tokens"],
            "llm_tokens": samples[f"level{finest}"][0]["llm_tokens"],
        }
    }
    text = core.config.text_config
    full_prefill, full_llm = med(f"level{finest}", "prefill"), med(f"llm{finest}", "llm")
    full_flops = prefill_flops(text, samples[f"level{finest}"][0]["llm_tokens"])
    for mode in [f"level{i}" for i in range(finest + 1)] + ["routed", "routed_full"]:
        row = {p: med(mode, p) for p in phases}
        row["visual_tokens"] = median(s["visual_tokens"] for s in samples[mode])
        row["llm_tokens"] = median(s["llm_tokens"] for s in samples[mode])
        row["levels_chosen"] = sorted({s["level"] for s in samples[mode]})
        row["routing_share"] = row["scaler_router"] / row["end_to_end"]
        if mode.startswith("level"):
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
    return {"modes": rows, "target_thresholds": TARGETS}
