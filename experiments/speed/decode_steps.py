"""Per-token decode time: HF generate vs avglab's greedy loop before and after issue 21, interleaved.

Builds the bench model (``model=bench_mid`` by default, as ``stage=bench``), splices one bench input at
full granularity and times, in one process with the three runs interleaved and the first repeat
discarded, the wall clock and this thread's CPU time of every token of

- ``hf``: ``LlavaNextForConditionalGeneration.generate`` (its default DynamicCache), stamped once per
  token by a stopping criterion that never stops;
- ``before``: the loop of ``avglab.core.generation`` before issue 21 (full LLaVA forward per step,
  DynamicCache, 2D mask concatenated per step), kept here as the reference;
- ``after``: today's ``greedy_generate`` (reserved cache, language model + LM head, no mask unpadded).

CPU time is the steadier figure on a shared machine (it leaves out time spent waiting for a core).
``--profile`` also prints torch.profiler's op table of the decode steps of ``before`` and ``after``.

    OMP_NUM_THREADS=1 python experiments/speed/decode_steps.py --tokens 128 --repeats 5
    OMP_NUM_THREADS=1 python experiments/speed/decode_steps.py --tokens 8 --repeats 2 --profile
"""

from __future__ import annotations

import argparse
import time
from statistics import mean, median

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from avglab.cli import CONFIG_DIR
from avglab.core.generation import greedy_generate
from avglab.tools.bench.inputs import bench_inputs
from avglab.tools.bench.timing import hf_inputs
from avglab.training.build import build_core, saved_tokenizer


def clock() -> tuple[float, float]:
    """(wall, this thread's CPU time) in seconds."""
    return time.perf_counter(), time.thread_time()


class Stamps(StoppingCriteria):
    """Never stops; records the clock when each token exists (HF calls it once per token)."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores, **kwargs):
        """Stamps; (B,) False."""
        self.times.append(clock())
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def before_issue_21(core, prompt, n: int, stamps: list) -> list:
    """The greedy loop as it was before issue 21 (eos handling left out: fixed-length decoding)."""
    out = core.llava(inputs_embeds=prompt.embeds, attention_mask=prompt.attention_mask,
                     position_ids=prompt.position_ids, use_cache=True, logits_to_keep=1)  # fmt: skip
    token = out.logits[:, -1].argmax(-1)
    stamps.append(clock())
    tokens, mask, position = [token], prompt.attention_mask, prompt.position_ids[:, -1:]
    for _ in range(n - 1):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        out = core.llava(input_ids=token[:, None], attention_mask=mask, position_ids=position,
                         past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
        token = out.logits[:, -1].argmax(-1)
        tokens.append(token)
        stamps.append(clock())
    return torch.stack(tokens, 1).tolist()


def per_token(stamps: list, count: int, index: int) -> float:
    """Mean ms of tokens 2..count from a run's stamps (start, token 1, token 2, ...); index 0 wall, 1 CPU."""
    return mean(
        1e3 * (b[index] - a[index]) for a, b in zip(stamps[1:count], stamps[2 : count + 1], strict=True)
    )


def main() -> None:
    """Times the three loops and prints per-token medians and HF/avglab ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bench_mid")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens decoded by every run")
    parser.add_argument("--repeats", type=int, default=5, help="repeats, the first one discarded")
    parser.add_argument("--profile", action="store_true", help="op table of before/after decode steps")
    parser.add_argument("--workspace", default="/tmp/avglab_decode_steps")
    args = parser.parse_args()
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        overrides = [f"workspace={args.workspace}", f"run_dir={args.workspace}/run", "stage=bench"]
        cfg = compose("config", overrides=[*overrides, f"model={args.model}", "router.ffn_size=768"])
    L.seed_everything(cfg.seed)
    tokenizer, image_processor, core = build_core(cfg, saved_tokenizer(cfg, None))
    core.eval()
    batch = bench_inputs(cfg, tokenizer, image_processor, core.config.image_grid_pinpoints)[0]
    hf = hf_inputs(core, batch, tokenizer.pad_token_id)
    with torch.no_grad():
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        finest = torch.full((1,), core.scaler.num_levels - 1)
        visual = core.pack(encoded, batch["image_sizes"], finest)
        prompt = core.splice(
            batch["prompt_input_ids"], batch["prompt_attention_mask"], visual, padding_side="left"
        )
    n = args.tokens
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=tokenizer.pad_token_id)  # fmt: skip

    def run(kind: str) -> tuple[list, list]:
        stamps = [clock()]
        if kind == "hf":  # from pixels: HF's vision pass is in its first token, not in its decode steps
            criterion = Stamps()
            out = core.llava.generate(
                **hf, generation_config=config, stopping_criteria=StoppingCriteriaList([criterion])
            )
            return stamps + criterion.times, out[:, -n:].tolist()
        if kind == "before":
            return stamps, before_issue_21(core, prompt, n, stamps)
        hook = core.llava.lm_head.register_forward_hook(lambda *_: stamps.append(clock()))
        tokens = greedy_generate(core, prompt, n, eos_token_id=-1).tokens.tolist()
        hook.remove()
        return stamps, tokens

    kinds = ["hf", "before", "after"]
    runs = {k: [] for k in kinds}
    tokens = {}
    for rep in range(args.repeats):
        for kind in kinds[rep % 3 :] + kinds[: rep % 3]:
            stamps, tokens[kind] = run(kind)
            runs[kind].append(stamps)
    print(f"context {prompt.embeds.shape[1]} tokens, threads {torch.get_num_threads()}, "
          f"same tokens: {tokens['hf'] == tokens['before'] == tokens['after']}")  # fmt: skip
    for count in sorted({min(8, n), n}):
        for name, index in (("wall", 0), ("cpu", 1)):
            per = {k: median(per_token(stamps, count, index) for stamps in v[1:]) for k, v in runs.items()}
            ratios = f"HF/before {per['hf'] / per['before']:.3f}, HF/after {per['hf'] / per['after']:.3f}"
            times = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
            print(f"{count:4d} new tokens, {name} ms per decoded token: {times}; {ratios}")
    if args.profile:
        profile_steps(core, prompt, n)


class StartOnFirstCall:
    """Forward hook entering ``prof`` at its first call (the LM head's first call ends the prompt pass)."""

    def __init__(self, prof):
        self.prof, self.started = prof, False

    def __call__(self, *_):
        """Starts the profiler once."""
        if not self.started:
            self.started = True
            self.prof.__enter__()


def profile_steps(core, prompt, n: int) -> None:
    """torch.profiler op tables of the decode steps of both avglab loops (from the first token on)."""
    from torch.profiler import ProfilerActivity, profile

    for kind in ("before", "after"):
        prof = profile(activities=[ProfilerActivity.CPU])
        hook = core.llava.lm_head.register_forward_hook(StartOnFirstCall(prof))
        if kind == "before":
            before_issue_21(core, prompt, n, [])
        else:
            greedy_generate(core, prompt, n, eos_token_id=-1)
        hook.remove()
        prof.__exit__(None, None, None)
        print(f"\n{kind}: decode steps 2..{n}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
