"""Pieces of a Hugging Face decoder's forward that avglab's layer-by-layer runs call in its order.

FocusLLaVA's text sampler and the in-LLM reductions (FastV, VTW) run the decoder layer by layer so
that they can drop tokens between layers; they call transformers' own layers, mask and rotary
embedding exactly as ``LlamaModel.forward`` does, through these helpers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half

from avglab.core.transformers_names import cache_keyword


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of (B, H, n, d) states with (B, n, d) cos/sin (as LLaMA applies it)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def causal_mask(language_model: nn.Module, hidden, attention_mask, position_ids, cache, layer_idx: int):
    """Transformers' own mask for the configured attention kernel, sized on ``layer_idx``'s cache.

    Args:
        language_model: the decoder (its ``config`` picks the kernel).
        hidden: (B, n, C) the layer input the mask is for.
        attention_mask: (B, S) padding mask over the cached and new positions.
        position_ids: (B, n).
        cache: the KV cache or None.
        layer_idx: the first layer the mask serves (its cache length counts).
    """
    return create_causal_mask(
        config=language_model.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        position_ids=position_ids,
        layer_idx=layer_idx,
        **{cache_keyword(create_causal_mask): cache},
    )


def run_layer(layer: nn.Module, hidden, causal, position_ids, position_embeddings, cache) -> torch.Tensor:
    """One decoder layer on (B, n, C) ``hidden``, called as ``LlamaModel.forward`` calls it."""
    return layer(
        hidden,
        attention_mask=causal,
        position_ids=position_ids,
        use_cache=cache is not None,
        position_embeddings=position_embeddings,
        **{cache_keyword(type(layer).forward): cache},
    )
