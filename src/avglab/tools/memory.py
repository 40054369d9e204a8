"""Memory per stage: measured for the tiny model on CPU, estimated for the paper's 7B setting.

    python -m avglab.tools.memory [--batch 8] [--world 8] [--text-tokens 128] [--json memory.json]

Measured (tiny, one training step of the real stage module on a generated batch, each stage in
a fresh process): parameter, gradient and AdamW bytes, the activations autograd keeps for
backward (unique storages), the process's peak RSS growth during the step, and how many times
the vision tower and the LLM ran (stage 3 must run each once: N granularities in one batched
LLM pass, pitfall 6) and on how many rows (stage 3 packs its N variants into shared rows).
Estimated (7B): see :mod:`avglab.tools.memory_estimate`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from avglab.tools.memory_estimate import (
    STAGE_TRAINS,
    activation_gb,
    calibrate,
    parameter_counts,
    state_gb,
)

MB = 1024**2
STRATEGIES = ("ddp", "fsdp2", "zero2", "zero3")


def tiny_stage(stage: str, workspace: Path, batch: int):
    """Config, stage module and one generated batch of ``batch`` samples for ``model=tiny``."""
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import get_class

    from avglab.cli import CONFIG_DIR
    from avglab.training.build import build_core, build_datamodule

    overrides = [f"stage={stage}", f"workspace={workspace}", f"run_dir={workspace}/runs/{stage}"]
    overrides += ["data.synth.n_train=8", f"data.synth.n_val={batch}", "data.synth.n_test=2"]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer, image_processor, core = build_core(cfg)
    data = build_datamodule(cfg, tokenizer, image_processor, eval_batch_size=batch)
    data.rank, data.world_size = 0, 1
    module = get_class(cfg.stage.module)(core=core, stage=cfg.stage)
    module.train()
    return module, next(iter(data.val_dataloader()))


def tensor_bytes(tensors) -> int:
    """Total bytes of some tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def measure_stage(stage: str, workspace: Path, batch: int = 8, steps: int = 2) -> dict:
    """AdamW steps of ``stage`` on the tiny model; the last is measured (with AdamW state from step 2 on)."""
    from avglab.tools.memory_estimate import saved_bytes

    module, data = tiny_stage(stage, workspace, batch)
    core = module.core
    trainable = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    calls = {"vision": 0, "llm": 0, "llm_rows": 0}

    def count(name):
        def hook(mod, args, kwargs):
            calls[name] += 1
            if name == "llm":
                calls["llm_rows"] = len(kwargs["inputs_embeds"])  # stage 3 packs its N variants (seqpack)

        return hook

    core.llava.model.vision_tower.register_forward_pre_hook(count("vision"), with_kwargs=True)
    core.llava.model.language_model.register_forward_pre_hook(count("llm"), with_kwargs=True)
    params = {p.untyped_storage().data_ptr() for p in core.parameters()}
    rss = current_rss()
    for _ in range(steps):
        calls.update(vision=0, llm=0)
        optimizer.zero_grad(set_to_none=True)
        activations = saved_bytes(lambda: module.training_step(data, 0).backward(), params)
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss
    grads = tensor_bytes(p.grad for p in trainable if p.grad is not None)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "batch": batch,
        "params_mb": tensor_bytes(core.parameters()) / MB,
        "trainable_mb": tensor_bytes(trainable) / MB,
        "grads_mb": grads / MB,
        "adamw_mb": tensor_bytes(states) / MB,
        "activations_mb": activations / MB,
        "peak_tensors_mb": (tensor_bytes(core.parameters()) + grads + tensor_bytes(states) + activations)
        / MB,
        "rss_growth_mb": max(peak, 0) / MB,
        "vision_passes": calls["vision"],
        "llm_passes": calls["llm"],
        "llm_rows": calls["llm_rows"],
    }


def measure_all(batch: int) -> dict[str, dict]:
    """Every training stage measured in its own process (peak RSS is per process)."""
    results = {}
    with tempfile.TemporaryDirectory() as workspace:
        for stage in STAGE_TRAINS:
            code = (
                "import json,sys; from pathlib import Path; from avglab.tools.memory import measure_stage; "
                f"print(json.dumps(measure_stage({stage!r}, Path({workspace!r}), {batch})))"
            )
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results[stage] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def estimate_7b(world: int, batch: int, text_tokens: int, router_ffn: int | None = None) -> dict:
    """Parameters, per-GPU state under each strategy, and activations per stage for the 7B setting."""
    counts = parameter_counts(router_ffn)
    costs = calibrate(router_ffn)
    total = sum(v for k, v in counts.items())
    embed_head = 2 * 32064 * 4096
    root = embed_head + counts["projector"] + counts["router"] + counts["newline"]
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008
    out = {"params": counts, "params_total": total, "router_share": counts["router"] / total, "stages": {}}
    for stage, parts in STAGE_TRAINS.items():
        trainable = sum(counts[p] for p in parts)
        acts = activation_gb(stage, costs, text_tokens, checkpointing=False)
        ckpt = activation_gb(stage, costs, text_tokens, checkpointing=True)
        out["stages"][stage] = {
            "trainable": trainable,
            "state_gb": {s: state_gb(total, trainable, s, world, root, layer) for s in STRATEGIES},
            "activations_gb_per_sample": acts,
            "activations_gb_per_sample_checkpointed": ckpt["total_gb"],
            "activations_gb_micro_batch": acts["total_gb"] * batch,
        }
    return out


def format_report(measured: dict, estimate: dict, world: int, batch: int, text_tokens: int) -> str:
    """Markdown tables of both parts."""
    lines = [f"Tiny model on CPU, one AdamW step, batch {next(iter(measured.values()))['batch']} (MB):", ""]
    keys = (
        "params_mb",
        "trainable_mb",
        "grads_mb",
        "adamw_mb",
        "activations_mb",
        "peak_tensors_mb",
        "rss_growth_mb",
    )
    lines.append("| stage | " + " | ".join(k[:-3] for k in keys) + " | vision/LLM passes | LLM rows |")
    lines.append("|---" * (len(keys) + 3) + "|")
    for stage, m in measured.items():
        row = " | ".join(f"{m[k]:.2f}" for k in keys)
        lines.append(f"| {stage} | {row} | {m['vision_passes']}/{m['llm_passes']} | {m['llm_rows']} |")
    p = estimate["params"]
    lines += [
        "",
        f"7B setting (llava-v1.6-vicuna-7b, router k=32): {estimate['params_total'] / 1e9:.3f} B parameters "
        f"(vision {p['vision'] / 1e6:.1f} M used + {p['vision_unused'] / 1e6:.1f} M unused, projector "
        f"{p['projector'] / 1e6:.1f} M, LLM {p['llm'] / 1e9:.3f} B, router {p['router'] / 1e6:.1f} M = "
        f"{100 * estimate['router_share']:.2f}%).",
        f"Per GPU, {world} GPUs, micro batch {batch}, one 672x672 image + {text_tokens} text tokens a "
        "sample, bf16 activations, fp32 master weights + AdamW (GB):",
        "",
        "| stage | trainable (B) | " + " | ".join(STRATEGIES) + " | activations/sample | x micro batch "
        "| with grad. checkpointing | LLM tokens (padded / unpadded) |",
        "|---" * (len(STRATEGIES) + 6) + "|",
    ]
    for stage, s in estimate["stages"].items():
        a = s["activations_gb_per_sample"]
        states = " | ".join(f"{s['state_gb'][k]:.1f}" for k in STRATEGIES)
        lines.append(
            f"| {stage} | {s['trainable'] / 1e9:.3f} | {states} | {a['total_gb']:.2f} | "
            f"{s['activations_gb_micro_batch']:.1f} | {s['activations_gb_per_sample_checkpointed']:.2f} | "
            f"{a['llm_tokens_padded']} / {a['llm_tokens_unpadded']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m avglab.tools.memory``: prints both tables (and writes JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description="Memory per stage: tiny measured, 7B estimated.")
    parser.add_argument("--batch", type=int, default=8, help="tiny model batch size")
    parser.add_argument("--world", type=int, default=8, help="GPUs for the 7B estimate")
    parser.add_argument("--micro-batch", type=int, default=1, help="7B micro batch per GPU")
    parser.add_argument("--text-tokens", type=int, default=128, help="7B text tokens per sample")
    parser.add_argument("--router-ffn", type=int, default=None, help="router ffn (default 4096)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    measured = measure_all(args.batch)
    estimate = estimate_7b(args.world, args.micro_batch, args.text_tokens, args.router_ffn)
    print(format_report(measured, estimate, args.world, args.micro_batch, args.text_tokens))
    if args.json:
        args.json.write_text(json.dumps({"tiny_cpu": measured, "vicuna_7b": estimate}, indent=2))


if __name__ == "__main__":
    main()
