"""Greedy decoding with a KV cache, timed per phase (prefill = time to first token, decode).

Batches are left-padded (``AvgCore.splice(..., padding_side="left")``): the last column is a real
token in every row and positions are counted over real tokens only, so a padded row decodes as it
would alone (``tests/model/test_generation_batched.py`` checks it).

Per decode step this does less than Hugging Face's ``generate`` on LLaVA-NeXT:

- the KV cache is reserved once for the whole generation (``reserved_cache``): a ``DynamicCache``
  concatenates every layer's keys and values into fresh tensors at every step, a copy of the whole
  cache per token (69% of a decode step at a 2968-token context on CPU, ``experiments/speed/``);
- the language model and the LM head run directly, the head on the last position only, without the
  LLaVA wrapper (no image branch, no deprecated-argument handling per step);
- without padding no attention mask is passed, so SDPA runs its causal / no-mask kernel and no mask
  is built or concatenated per step; a padded batch reads growing views of one reserved 2D mask.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from avglab.core.model import AvgCore
from avglab.core.splice import Spliced
from avglab.core.transformers_names import cache_keyword


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


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views of buffers reserved for the whole generation.

    ``update`` writes the new positions in place and returns ``buffer[:, :, :length]``: no per-step
    copy of the cache (a ``DynamicLayer`` concatenates into new tensors every step). Past the reserve
    the buffers double. Reset, crop and the batch reshuffles of beam search keep buffer and views in step.

    Args:
        capacity: positions to reserve (prompt + new tokens).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        """(Re)allocates the buffers for ``capacity`` positions, keeping what is cached."""
        batch, heads, _, key_dim = key_states.shape
        keys = key_states.new_empty(batch, heads, capacity, key_dim)
        values = value_states.new_empty(batch, heads, capacity, value_states.shape[-1])
        if self.length:
            keys[:, :, : self.length] = self.key_buffer[:, :, : self.length]
            values[:, :, : self.length] = self.value_buffer[:, :, : self.length]
        self.key_buffer, self.value_buffer, self.capacity = keys, values, capacity
        self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends (B, H, n, D) keys and values; returns every cached position (views)."""
        end = self.length + key_states.shape[-2]
        if self.key_buffer is None or end > self.capacity:
            self.reserve(key_states, value_states, max(end, self.capacity, 2 * self.length))
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self.views()

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sets and returns ``keys``/``values``: the first ``length`` positions of the buffers."""
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        self.is_initialized = True
        return self.keys, self.values

    def reset(self) -> None:
        """Empties the layer (the next update reserves buffers for its own batch)."""
        super().reset()
        self.length, self.key_buffer, self.value_buffer = 0, None, None

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        super().crop(tokens_to_remove)
        if self.is_initialized:
            self.length = self.keys.shape[-2]

    def rebatch(self, index) -> None:
        """Applies a batch-axis selection to the buffers (beam reorder, batch select or repeat)."""
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = self.key_buffer[index], self.value_buffer[index]
            self.views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorders the batch for beam search."""
        self.rebatch(beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows ``indices``."""
        self.rebatch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeats every row ``repeats`` times."""
        if self.key_buffer is not None:
            self.rebatch(torch.arange(len(self.key_buffer), device=self.device).repeat_interleave(repeats))


def reserved_cache(config, capacity: int) -> DynamicCache:
    """A ``DynamicCache`` of ``ReservedLayer``s for a model whose layers all attend to every position.

    Sliding-window or other special layers keep Hugging Face's own layer types (their semantics are
    theirs), so the result is always correct and reserved wherever it can be.
    """
    cache = DynamicCache(config=config)
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def cache_argument(forward_type: type) -> str:
    """The name under which the language model takes its cache (``cache`` from transformers 5.2x on)."""
    return cache_keyword(forward_type.forward)


def language_model_step(
    language_model: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    cache: DynamicCache,
) -> torch.Tensor:
    """(B, C) last hidden state of the last position after feeding ``embeds`` (B, n, C) to the cached LLM."""
    out = language_model(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(type(language_model)): cache},
    )
    return out.last_hidden_state[:, -1]


@torch.no_grad()
def greedy_generate(
    core: AvgCore, prompt: Spliced, max_new_tokens: int, eos_token_id: int, step_ms: list | None = None
) -> Generated:
    """Greedy decoding from spliced (left-padded for batches) prompt embeddings.

    Positions are counted over real tokens, so left padding does not shift them. The prompt pass
    computes logits for the last position only (as ``logits_to_keep=1``). ``eos_token_id=-1`` never
    stops early (fixed-length decoding for benchmarks).

    Args:
        core: the model core (its ``llava`` holds the LLM and the LM head).
        prompt: (B, S, C) left-padded prompt from ``splice``.
        max_new_tokens: generation budget.
        eos_token_id: ends a row; that row's later tokens are eos.
        step_ms: a list that receives each decode step's time in ms (benchmarks; synchronizes after
            every step).
    """
    device = prompt.embeds.device
    llava = core.llava
    language_model, head, embed = llava.model.language_model, llava.lm_head, llava.get_input_embeddings()
    batch, length = prompt.attention_mask.shape
    cache = reserved_cache(language_model.config, length + max_new_tokens - 1)
    reduction = getattr(core, "reduction", None)  # in-LLM pruning (avglab.reduce) brings its own steps
    in_llm = reduction is not None and reduction.in_llm
    step = reduction.stepper(core, prompt) if in_llm else language_model_step
    full_mask = None  # no padding: no mask at all (SDPA's causal / no-mask kernels)
    if not bool(prompt.attention_mask.all()):
        full_mask = prompt.attention_mask.new_ones(batch, length + max_new_tokens)
        full_mask[:, :length] = prompt.attention_mask
    start = time.perf_counter()
    mask = None if full_mask is None else full_mask[:, :length]
    hidden = step(language_model, prompt.embeds, mask, prompt.position_ids, cache)
    token = head(hidden).argmax(-1)
    synchronize(device)
    prefill = time.perf_counter() - start
    tokens, position = [token], prompt.position_ids[:, -1:]
    done = token == eos_token_id
    steps = 0
    start = last = time.perf_counter()
    while steps < max_new_tokens - 1 and not bool(done.all()):
        position = position + 1
        mask = None if full_mask is None else full_mask[:, : length + steps + 1]
        hidden = step(language_model, embed(token[:, None]), mask, position, cache)
        token = torch.where(done, torch.full_like(token, eos_token_id), head(hidden).argmax(-1))
        tokens.append(token)
        done = done | (token == eos_token_id)
        steps += 1
        if step_ms is not None:
            synchronize(device)
            now = time.perf_counter()
            step_ms.append((now - last) * 1e3)
            last = now
    synchronize(device)
    decode = (time.perf_counter() - start) * 1e3
    out = Generated(torch.stack(tokens, dim=1), prefill * 1e3, decode, steps)
    return out if step is language_model_step else step.generated(out)
