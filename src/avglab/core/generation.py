"""Greedy decoding with a KV cache, timed per phase (prefill = time to first token, decode).

Batches are left-padded (``AvgCore.splice(..., padding_side="left")``): the last column is a real
token in every row and positions are counted over real tokens only, so a padded row decodes as it
would alone (``tests/model/test_generation_batched.py`` checks it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from avglab.core.model import AvgCore
from avglab.core.splice import Spliced


def synchronize(device: torch.device) -> None:
    """Waits for queued GPU work so wall-clock phases are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Generated:
    """Greedy output.

    Attributes:
        tokens: (B, T) generated ids, eos included, padded with eos after it.
        prefill_ms: time of the prompt pass that yields the first token.
        decode_ms: time of all later steps.
        decode_steps: number of later steps.
    """

    tokens: torch.Tensor
    prefill_ms: float
    decode_ms: float
    decode_steps: int


@torch.no_grad()
def greedy_generate(core: AvgCore, prompt: Spliced, max_new_tokens: int, eos_token_id: int) -> Generated:
    """Greedy decoding from spliced (left-padded for batches) prompt embeddings.

    Positions are counted over real tokens, so left padding does not shift them. The prompt pass
    keeps only the last position's logits (``logits_to_keep=1``): (B, S, V) logits would cost more
    than the LM head is worth on long visual prompts. ``eos_token_id=-1`` never stops early
    (fixed-length decoding for benchmarks).

    Args:
        core: the model core (its ``llava`` runs the LLM).
        prompt: (B, S, C) left-padded prompt from ``splice``.
        max_new_tokens: generation budget.
        eos_token_id: ends a row; that row's later tokens are eos.
    """
    device = prompt.embeds.device
    start = time.perf_counter()
    out = core.llava(
        inputs_embeds=prompt.embeds,
        attention_mask=prompt.attention_mask,
        position_ids=prompt.position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    token = out.logits[:, -1].argmax(-1)
    synchronize(device)
    prefill = time.perf_counter() - start
    tokens, mask, position = [token], prompt.attention_mask, prompt.position_ids[:, -1:]
    done = token == eos_token_id
    start, steps = time.perf_counter(), 0
    while steps < max_new_tokens - 1 and not bool(done.all()):
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        position = position + 1
        out = core.llava(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        token = torch.where(done, torch.full_like(token, eos_token_id), out.logits[:, -1].argmax(-1))
        tokens.append(token)
        done = done | (token == eos_token_id)
        steps += 1
    synchronize(device)
    return Generated(torch.stack(tokens, dim=1), prefill * 1e3, (time.perf_counter() - start) * 1e3, steps)
