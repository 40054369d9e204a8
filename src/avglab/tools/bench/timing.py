"""One timed run per mode: HF ``generate``, avglab's pipeline and the bare LLM forward.

Every generating mode records the time of each token: ``ttft`` (start to the first token) and
``step_ms`` (each later token), so the runner reads decode per token and end to end at any number
of new tokens up to the one decoded (``greedy_generate`` and HF's loop both report per token).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from avglab.core.generation import greedy_generate, synchronize
from avglab.core.model import AvgCore


def now(device: torch.device) -> float:
    """Wall clock after queued GPU work (phases stay honest on CUDA)."""
    synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def avglab_run(core: AvgCore, batch: dict, level: int | None, max_new_tokens: int, route: bool) -> dict:
    """The avglab evaluation path on one batch (left-padded), timed per phase (ms).

    Args:
        core: the model core.
        batch: a collate batch.
        level: level fed to the LLM for every sample; None = the router's choice.
        max_new_tokens: tokens generated (no early stop: every mode decodes the same count).
        route: run the scaler + router even if ``level`` is given (overhead when that level is chosen).

    Returns:
        ms per phase (vision_projector, scaler_router, pack_splice, prefill, ttft), ``step_ms`` (each
        later token), the level of the first sample, visual and LLM input token counts of the first
        sample, the generated ids (one list per sample) and the spliced prompt.
    """
    device = core.llava.device
    size = len(batch["input_ids"])
    start = now(device)
    tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    t_vision = now(device)
    encoded = core.pyramid(tiles, owner, batch["has_image"])
    chosen = core.select(encoded, batch)[0] if route or level is None else None
    levels = chosen if level is None else torch.full((size,), level)
    t_select = now(device)
    visual = core.pack(encoded, batch["image_sizes"], levels)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    prompt = core.splice(ids, mask, visual, padding_side="left")
    t_pack = now(device)
    step_ms: list[float] = []
    generated = greedy_generate(core, prompt, max_new_tokens, eos_token_id=-1, step_ms=step_ms)
    return {
        "vision_projector": (t_vision - start) * 1e3,
        "scaler_router": (t_select - t_vision) * 1e3,
        "pack_splice": (t_pack - t_select) * 1e3,
        "prefill": generated.prefill_ms,
        "ttft": (t_pack - start) * 1e3 + generated.prefill_ms,
        "step_ms": step_ms,
        "level": int(levels[0]),
        "visual_tokens": len(visual[0]),
        "llm_tokens": int(prompt.attention_mask[0].sum()),
        "batch_visual_tokens": sum(len(v) for v in visual if v is not None),  # throughput
        "sample_llm_tokens": prompt.attention_mask.sum(1).tolist(),
        "batch_levels": levels.tolist(),
        "tokens": generated.tokens.tolist(),
        "prompt": prompt,
    }


def hf_inputs(core: AvgCore, batch: dict, pad_token_id: int) -> dict:
    """The batch as HF's processor would give it.

    ``<image>`` is expanded to the full-granularity count and rows are left-padded, as for HF batched
    generation.
    """
    counts = core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu())[:, -1].tolist()
    rows = []
    for row, count in enumerate(counts):
        ids = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
        place = int((ids == core.image_token_id).nonzero()[0])
        rows.append(torch.cat([ids[:place], ids.new_full((count,), core.image_token_id), ids[place + 1 :]]))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=rows[0].dtype)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = ids
        attention_mask[row, width - len(ids) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": batch["pixel_values"],
        "image_sizes": batch["image_sizes"],
    }


class TokenClock(StoppingCriteria):
    """Never stops; records the time at which each new token exists (HF calls it once per token)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """Stamps the token just generated; (B,) False."""
        self.times.append(now(self.device))
        return torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def hf_run(core: AvgCore, inputs: dict, max_new_tokens: int, pad_token_id: int) -> dict:
    """HF ``LlavaNextForConditionalGeneration.generate`` (greedy, its default cache), timed per token.

    ``inputs`` are either HF's own (``input_ids``, ``pixel_values``: the full-granularity pipeline) or
    avglab's spliced prompt (``inputs_embeds``: HF's decoding loop at the same context as an avglab
    level). No eos: exactly ``max_new_tokens`` tokens, as in the avglab modes.

    Returns:
        ttft (ms to the first token), step_ms (each later token), the generated ids per sample.
    """
    device = core.llava.device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_token_id
    )
    clock = TokenClock(device)
    start = now(device)
    with without_eos(core.llava):
        out = core.llava.generate(
            **inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([clock])
        )
    times = [start] + clock.times
    steps = [(b - a) * 1e3 for a, b in zip(times[1:-1], times[2:], strict=True)]
    return {"ttft": (times[1] - start) * 1e3, "step_ms": steps, "tokens": out[:, -max_new_tokens:].tolist()}


@contextmanager
def without_eos(model) -> Iterator[None]:
    """The model's own generation config without an eos id for the duration.

    ``generate`` fills every unset (None) field of the config it is given from the model's config, so
    ``eos_token_id=None`` alone still stops a row at the model's eos, after which its tokens are padding.
    """
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def hf_embeds(prompt) -> dict:
    """HF ``generate`` inputs for avglab's spliced (left-padded) prompt of one level."""
    return {"inputs_embeds": prompt.embeds, "attention_mask": prompt.attention_mask}


@torch.no_grad()
def hf_vision_run(core: AvgCore, inputs: dict) -> float:
    """HF's vision tower + projector + full-grid packing (``get_image_features``), in ms."""
    device = core.llava.device
    start = now(device)
    core.llava.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    return (now(device) - start) * 1e3


@torch.no_grad()
def llm_run(core: AvgCore, prompt) -> float:
    """The bare LLM on a prompt (decoder stack with KV cache + LM head on the last position), in ms.

    The input is avglab's own spliced prompt of that level, so lengths match the pipeline exactly.
    """
    device = core.llava.device
    start = now(device)
    hidden = core.llava.model.language_model(
        inputs_embeds=prompt.embeds,
        attention_mask=prompt.attention_mask,
        position_ids=prompt.position_ids,
        use_cache=True,
    ).last_hidden_state
    core.llava.lm_head(hidden[:, -1:])
    return (now(device) - start) * 1e3
