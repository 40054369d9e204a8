"""``stage.compare_routers`` in ``stage=bench``: what each router variant costs when the finest level is fed.

The paper's router is one full-width Transformer layer over all N levels plus k instruction tokens,
so its share of end to end is set by the LLM's depth. Each entry of ``stage.compare_routers`` is a set of
``router.*`` overrides (``{input_levels: [0, 1, 2]}``, ``{width: 128}``, ...) built on the run's router
config. At batch size 1 every repeat runs the pipeline without a router (finest level) and then each
variant with its scaler + router run and the finest level fed (``avglab_routed_full`` of the main
table), interleaved on the same inputs, so the shares are ratios of side-by-side runs. Weights are
random: the cost of a router does not depend on them.
"""

from __future__ import annotations

from statistics import median

import torch
from omegaconf import OmegaConf

from avglab.data.anyres import num_tiles
from avglab.tools.bench.flops import prefill_flops, router_flops
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.timing import avglab_run
from avglab.training.build import build_selector, check_router


def variant_label(spec) -> str:
    """``input_levels=[0, 1, 2] width=128`` for a spec, ``paper`` for an empty one."""
    items = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else dict(spec)
    return " ".join(f"{k}={v}" for k, v in items.items()) or "paper"


def build_variants(cfg, core) -> dict[str, torch.nn.Module]:
    """The paper's router (the run's ``router`` config) and one router per ``stage.compare_routers`` entry.

    Raises:
        ValueError: naming the key, for a variant whose config cannot build (unknown keys fail in
            ``OmegaConf.merge`` under struct mode).
    """
    hidden = core.config.text_config.hidden_size
    grid = core.grid
    variants = {}
    base = OmegaConf.create(OmegaConf.to_container(cfg.router, resolve=True))
    OmegaConf.set_struct(base, True)  # a misspelt key of a variant fails here
    for spec in [{}, *cfg.stage.compare_routers]:
        router = OmegaConf.merge(base, spec)
        if router.kind not in ("avg", "image_only"):
            raise ValueError(f"stage.compare_routers: router.kind={router.kind!r} has no router to time")
        check_router(OmegaConf.create({"router": router}), grid)
        torch.manual_seed(0)
        selector = build_selector(router, hidden).to(core.llava.device, core.llava.dtype).eval()
        variants[variant_label(spec)] = selector
    return variants


@torch.no_grad()
def time_routers(cfg, core, tokenizer, image_processor, counts: list[int]) -> dict:
    """Median scaler + router time and its share of end to end per router variant, finest level fed.

    Args:
        cfg: the composed config (``stage.compare_routers``, repeats, warmup).
        core: the model core; its selector is swapped per variant and restored.
        tokenizer: the run's tokenizer.
        image_processor: the run's image processor.
        counts: new-token counts at which end to end is read (one share per count).

    Returns:
        ``{"modes": {label: row}, "counts": counts, "tiles": tiles}``; the run without a router is ``none``.
    """
    stage = cfg.stage
    variants = build_variants(cfg, core)
    batches = bench_inputs(cfg, tokenizer, image_processor, core.config.image_grid_pinpoints, 1)
    finest, n_new = core.scaler.num_levels - 1, max(counts)
    configured, runs = core.selector, {name: [] for name in ["none", *variants]}
    try:
        for rep in range(stage.warmup + stage.repeats):
            for batch in batches:
                for name in runs:
                    core.selector = variants.get(name)
                    out = avglab_run(core, batch, finest, n_new, route=name != "none")
                    out.pop("prompt")
                    if rep >= stage.warmup:
                        runs[name].append(out)
    finally:
        core.selector = configured
    size = batches[0]["image_sizes"][0].tolist()
    tiles = num_tiles(size, core.config.image_grid_pinpoints, core.tile_size)
    full = prefill_flops(core.config.text_config, runs["none"][0]["llm_tokens"])
    rows = {}
    for name, samples in runs.items():
        selector = variants.get(name)
        flops = router_flops(selector, tiles) if selector is not None else 0.0

        def e2e(run: dict, n: int) -> float:
            return run["ttft"] + sum(run["step_ms"][: n - 1])

        rows[name] = {
            "parameters": sum(p.numel() for p in selector.parameters()) if selector is not None else 0,
            "seq_len": getattr(selector, "seq_len", 0),
            "router_flops": flops,
            "router_flop_share": flops / (flops + full),
            "scaler_router": median(r["scaler_router"] for r in samples),
            # share of the same run's end to end, and the run's end to end against the router-free run's
            "routing_share": {n: median(r["scaler_router"] / e2e(r, n) for r in samples) for n in counts},
            "end_to_end": {n: median(e2e(r, n) for r in samples) for n in counts},
        }
    for row in rows.values():
        row["vs_none"] = {n: row["end_to_end"][n] / rows["none"]["end_to_end"][n] for n in counts}
    return {"modes": rows, "counts": counts, "tiles": tiles, "llm_parameters": core.llava.num_parameters()}


def format_routers(result: dict) -> str:
    """Markdown: one row per router variant, its cost when the finest level is chosen."""
    counts = result["counts"]
    head = [
        "router",
        "parameters",
        "% of LMM",
        "L per tile",
        "router GFLOPs",
        "FLOP share",
        "scaler+router ms",
    ]
    head += [f"share of e2e @{n}" for n in counts] + [f"e2e / no router @{n}" for n in counts]
    lines = [
        f"### router variants, finest level fed, batch size 1 ({result['tiles']} tiles)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, m in result["modes"].items():
        row = [
            name, f"{m['parameters']:,}", f"{100 * m['parameters'] / result['llm_parameters']:.2f}",
            str(m["seq_len"]), f"{m['router_flops'] / 1e9:.2f}", f"{100 * m['router_flop_share']:.2f}%",
            f"{m['scaler_router']:.1f}",
        ]  # fmt: skip
        row += [f"{100 * m['routing_share'][n]:.2f}%" for n in counts]
        row += [f"{m['vs_none'][n]:.3f}" for n in counts]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
