"""Analytic prefill FLOPs of the LLM for a given input length (the bound a shorter input can buy)."""

from __future__ import annotations

from avglab.reduce.accounting import layered_prefill_flops


def prefill_flops(text_config, seq_len: int) -> float:
    """FLOPs of one LLaMA-style prefill of ``seq_len`` tokens, LM head on the last position only.

    Counted as 2 FLOPs per multiply-add: per layer the q/k/v/o projections (grouped k/v heads
    respected), the gated MLP (3 matrices) and causal attention (QK^T and AV over the S(S+1)/2
    visible pairs); norms, RoPE and softmax are left out (O(S*h), negligible). The LM head runs on
    one position, as with ``logits_to_keep=1``.

    Args:
        text_config: the LLM's config (hidden_size, intermediate_size, num_hidden_layers,
            num_attention_heads, num_key_value_heads, vocab_size).
        seq_len: input tokens S (text + visual).
    """
    return layered_prefill_flops(text_config, [seq_len] * text_config.num_hidden_layers)


def router_flops(router, tiles: int) -> float:
    """FLOPs of one AVG-LLaVA router call on an image of ``tiles`` tiles (global view included).

    Each tile's L = sum(granularities) + k tokens go through every linear map of the router (the
    Transformer layer's q/k/v/o and feed-forward, the token-to-logits MLP) and full (non-causal)
    attention over L; the instruction filter and the voter are O(L*h) and left out.

    Args:
        router: a ``GranularityRouter`` (anything else: 0, it has no per-token cost).
        tiles: tiles of the image.
    """
    layer = getattr(router, "layer", None)
    if layer is None:
        return 0.0
    from torch import nn

    seq = router.seq_len
    weights = sum(m.in_features * m.out_features for m in router.modules() if isinstance(m, nn.Linear))
    weights += layer.self_attn.in_proj_weight.numel()  # q, k, v packed in MultiheadAttention
    hidden = layer.self_attn.embed_dim
    return tiles * (2 * seq * weights + 4 * seq * seq * hidden)
