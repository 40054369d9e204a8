"""One timed run per mode at batch size 1: HF ``generate``, avglab's pipeline and the bare LLM forward."""

from __future__ import annotations

import time

import torch
from transformers import GenerationConfig

from avglab.core.generation import greedy_generate, synchronize
from avglab.core.model import AvgCore


def now(device: torch.device) -> float:
    """Wall clock after queued GPU work (phases stay honest on CUDA)."""
    synchronize(device)
    return time.perf_counter()


@torch.no_grad()
def avglab_run(core: AvgCore, batch: dict, level: int | None, max_new_tokens: int, route: bool) -> dict:
    """The avglab evaluation path on one sample, timed per phase (ms).

    Args:
        core: the model core.
        batch: a collate batch of one sample.
        level: level fed to the LLM; None = the router's choice.
        max_new_tokens: tokens generated (no early stop: every mode decodes the same count).
        route: run the scaler + router even if ``level`` is given (overhead when that level is chosen).

    Returns:
        ms per phase (vision_projector, scaler_router, pack_splice, prefill, decode_per_token,
        end_to_end), the level used, visual and LLM input token counts, the generated ids.
    """
    device = core.llava.device
    start = now(device)
    tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    t_vision = now(device)
    encoded = core.pyramid(tiles, owner, batch["has_image"])
    chosen = core.select(encoded, batch)[0] if route or level is None else None
    levels = chosen if level is None else torch.full((1,), level)
    t_select = now(device)
    visual = core.pack(encoded, batch["image_sizes"], levels)
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    prompt = core.splice(ids, mask, visual, padding_side="left")
    t_pack = now(device)
    generated = greedy_generate(core, prompt, max_new_tokens, eos_token_id=-1)
    end = now(device)
    return {
        "vision_projector": (t_vision - start) * 1e3,
        "scaler_router": (t_select - t_vision) * 1e3,
        "pack_splice": (t_pack - t_select) * 1e3,
        "prefill": generated.prefill_ms,
        "ttft": (t_pack - start) * 1e3 + generated.prefill_ms,
        "decode_per_token": generated.decode_ms / max(1, generated.decode_steps),
        "end_to_end": (end - start) * 1e3,
        "level": int(levels[0]),
        "visual_tokens": len(visual[0]),
        "llm_tokens": int(prompt.attention_mask.sum()),
        "tokens": generated.tokens[0].tolist(),
        "prompt": prompt,
    }


def hf_inputs(core: AvgCore, batch: dict) -> dict:
    """The sample as HF's processor would give it: ``<image>`` expanded to the full-granularity count."""
    ids = batch["prompt_input_ids"][0][batch["prompt_attention_mask"][0].bool()]
    count = int(core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu())[0, -1])
    place = int((ids == core.image_token_id).nonzero()[0])
    expanded = torch.cat([ids[:place], ids.new_full((count,), core.image_token_id), ids[place + 1 :]])[None]
    return {
        "input_ids": expanded,
        "attention_mask": torch.ones_like(expanded),
        "pixel_values": batch["pixel_values"],
        "image_sizes": batch["image_sizes"],
    }


@torch.no_grad()
def hf_run(core: AvgCore, inputs: dict, max_new_tokens: int, pad_token_id: int) -> dict:
    """HF ``LlavaNextForConditionalGeneration.generate`` (greedy, full tokens), end to end, in ms.

    No eos: exactly ``max_new_tokens`` tokens, as in the avglab modes.
    """
    device = core.llava.device
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=pad_token_id
    )
    start = now(device)
    out = core.llava.generate(**inputs, generation_config=config)
    end = now(device)
    return {"end_to_end": (end - start) * 1e3, "tokens": out[0, inputs["input_ids"].shape[1] :].tolist()}


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
