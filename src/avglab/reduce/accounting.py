"""Honest cost of a reduction: visual tokens per LLM layer and prefill FLOPs relative to the finest level.

A first-layer token count cannot compare a method that prunes inside the LLM (FastV, VTW) with one
that prunes before it (PruMerge+, AVG-LLaVA's levels); the prefill FLOPs over every layer can. The
bench's ``avglab.tools.bench.flops.prefill_flops`` is this count with the same length at every layer.
"""

from __future__ import annotations

from collections.abc import Sequence


def layer_flops(text_config, seq_len: int) -> float:
    """FLOPs of one LLaMA-style decoder layer on a ``seq_len`` prefill (2 per multiply-add).

    q/k/v/o projections (grouped k/v heads respected), the gated MLP and causal attention over the
    S(S+1)/2 visible pairs; norms, RoPE and softmax left out, as in the bench's count.
    """
    h, f = text_config.hidden_size, text_config.intermediate_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    s = seq_len
    projections = 2 * s * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim)
    mlp = 2 * s * 3 * h * f
    attention = 2 * 2 * heads * head_dim * s * (s + 1) / 2
    return projections + mlp + attention


def layered_prefill_flops(text_config, tokens_per_layer: Sequence[int]) -> float:
    """Prefill FLOPs when layer l sees ``tokens_per_layer[l]`` tokens, LM head on the last position."""
    head = 2 * text_config.hidden_size * text_config.vocab_size
    return sum(layer_flops(text_config, int(s)) for s in tokens_per_layer) + head


def relative_prefill_flops(
    text_config, text_tokens: int, visual_per_layer: Sequence[int], full: int
) -> float:
    """A sample's prefill FLOPs over the same prompt's at the finest level (``full`` tokens, every layer)."""
    depth = len(visual_per_layer)
    ours = layered_prefill_flops(text_config, [text_tokens + v for v in visual_per_layer])
    return ours / layered_prefill_flops(text_config, [text_tokens + full] * depth)
