"""Per-sample profile of routed vs finest-fixed generation on the tiny default (issue 19).

    python experiments/speed/tiny_selection.py --router NAME=STAGE4_OUTPUT[:OVERRIDE;...] [...] --samples 32

Loads each stage-4 output (its router; ``OVERRIDE``s such as ``router.width=32`` rebuild a variant's shape),
takes the first ``--samples`` synth test samples and, per sample, runs every configuration alone at batch
size 1, interleaved (so load drifts hit all alike): the finest fixed level (no router) and each router's
routed pipeline. Every phase of ``stage=eval``'s latency is split further: selection into the scaler, the
router's input gathering, the router forward and packing. Prints median ms per phase.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from statistics import median

import torch
from hydra import compose, initialize_config_dir

from avglab.cli import CONFIG_DIR
from avglab.core.generation import greedy_generate
from avglab.run import load_weights
from avglab.training.build import build_core, build_datamodule, saved_tokenizer

PHASES = ("vision", "scaler", "router_input", "router", "pack_splice", "prefill", "decode", "total")


def load(folder: str, overrides: list[str]):
    """Tokenizer, image processor and core of a stage-4 output folder (eval config, tiny model)."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["stage=eval", f"init_from={folder}", *overrides])
    tokenizer, image_processor, core = build_core(cfg, saved_tokenizer(cfg, folder))
    load_weights(cfg, core, folder)
    return cfg, tokenizer, image_processor, core.eval()


@torch.no_grad()
def profile(core, batch: dict, routed: bool, eos: int, new_tokens: int) -> dict:
    """Milliseconds per phase of one sample (batch of 1), routed or at the finest level."""
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return (clock[-1] - clock[-2]) * 1e3

    out = {}
    tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    out["vision"] = lap()
    encoded = core.pyramid(tiles, owner, batch["has_image"])
    out["scaler"] = lap()
    if routed:
        inputs = core.router_input(encoded, batch["input_ids"], batch["instruction_mask"])
        out["router_input"] = lap()
        levels = core.selector(inputs).argmax(-1).cpu()
        out["router"] = lap()
    else:
        levels = torch.full((1,), core.scaler.num_levels - 1)
        out["router_input"] = out["router"] = 0.0
    visual = core.pack(encoded, batch["image_sizes"], levels)
    prompt = core.splice(
        batch["prompt_input_ids"], batch["prompt_attention_mask"], visual, padding_side="left"
    )
    out["pack_splice"] = lap()
    generated = greedy_generate(core, prompt, new_tokens, eos)
    lap()
    out["prefill"], out["decode"] = generated.prefill_ms, generated.decode_ms
    out["total"] = (clock[-1] - clock[0]) * 1e3
    out["visual_tokens"] = len(visual[0])
    return out


def main() -> None:
    """Prints one row per configuration: median ms per phase over the samples."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--router", action="append", required=True, help="NAME=FOLDER[:key=value;...]")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=2, help="passes over the samples (the first is warm-up)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cores = {}
    for spec in args.router:
        name, rest = spec.split("=", 1)
        folder, _, overrides = rest.partition(":")
        cores[name] = load(folder, [o for o in overrides.split(";") if o])
    cfg, tokenizer, image_processor, first = next(iter(cores.values()))
    data = build_datamodule(cfg, tokenizer, image_processor, eval_batch_size=1)
    data.setup("test")
    batches = [b for _, b in zip(range(args.samples), data.test_dataloader(), strict=False)]
    configs = [("fixed_finest", first, False)] + [(n, c[3], True) for n, c in cores.items()]
    runs = defaultdict(list)
    for rep in range(args.repeats):
        for batch in batches:
            for name, core, routed in configs:
                out = profile(core, batch, routed, tokenizer.eos_token_id, cfg.stage.max_new_tokens)
                if rep:
                    runs[name].append(out)
    passes = args.repeats - 1
    print(f"median ms per sample, batch size 1, {len(batches)} samples x {passes} timed passes, 1 thread")
    print("| configuration | visual tokens (mean) | " + " | ".join(PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for name, samples in runs.items():
        tokens = sum(s["visual_tokens"] for s in samples) / len(samples)
        cells = [f"{median(s[p] for s in samples):.2f}" for p in PHASES]
        print(f"| {name} | {tokens:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
