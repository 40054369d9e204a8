"""FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): attention-ranked LLM pruning.

After layer K (paper: K = 2) only the top ``keep`` share of the visual tokens (paper: R = 50% pruned,
keep = 0.5) go on, ranked by the attention they receive in layer K: per the paper, the average over
heads of the attention each token receives from all tokens (``score=mean``); FastV's public code
ranks by the last token's row instead (``score=last``). In inference layer K runs once, from its own
projections with an explicit softmax that gives both its output and the score (no second attention);
every other layer runs its configured kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from avglab.core.decoder_parts import rope
from avglab.reduce.base import InLLMReduction, ReduceConfigError

QUERY_CHUNK = 512  # queries per attention block: (B, H, 512, <= S) floats at a time, not (B, H, S, S)


def _query_weights(mask: torch.Tensor, last_only: bool) -> torch.Tensor:
    """(B, S) each real query's weight in FastV's mean (all real queries, or the last real one)."""
    real = mask.bool()
    if last_only:  # the last real query per row: its index is the last 1 of the mask
        last = real.shape[1] - 1 - real.flip(1).int().argmax(1)
        real = torch.zeros_like(real).scatter(1, last[:, None], True)
    return real.float() / real.sum(1, keepdim=True).clamp(min=1)


def _attend(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    last_only: bool,
    cache=None,
    with_output: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Received attention of one layer, and with ``with_output`` the layer's output from the same softmax."""
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    cos, sin = position_embeddings
    q = attn.q_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    k = rope(attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2), cos, sin)
    q = rope(q, cos, sin)
    heads = q.shape[1]
    v = None
    if with_output:
        v = attn.v_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
        if cache is not None:  # a prefill: this layer's cache is empty, so it returns k, v as given
            k, v = cache.update(k, v, attn.layer_idx)
        v = repeat_kv(v, heads // v.shape[1])
    k = repeat_kv(k, heads // k.shape[1])  # (B, H, S, d)
    real = mask.bool()
    weights = _query_weights(mask, last_only) / heads  # (B, S): weight in the mean over heads and queries
    padded = not bool(real.all())
    lowest = torch.finfo(torch.float32).min  # not -inf: a padding query's all-masked row stays finite
    total = torch.zeros(batch, seq, dtype=torch.float32, device=hidden.device)
    out = torch.empty_like(q) if with_output else None  # (B, H, S, d)
    for start in range(0, seq, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, seq)
        chunk = weights[:, start:stop]  # (B, n)
        if not with_output and not bool(chunk.any()):
            continue
        # causal: the queries of [start, stop) see keys < stop only, so the rest is never computed
        logits = ((q[:, :, start:stop] * attn.scaling) @ k[:, :, :stop].transpose(-1, -2)).float()
        future = torch.ones(stop - start, stop - start, dtype=torch.bool, device=hidden.device).triu(1)
        logits[..., start:stop].masked_fill_(future, lowest)
        if padded:
            logits.masked_fill_(~real[:, None, None, :stop], lowest)
        probs = logits.softmax(-1)  # (B, H, n, stop), float32 as eager attention's softmax
        # the chunk's weighted sum over queries as a batched gemv, then over heads: (B, H, 1, stop)
        total[:, :stop] += (chunk[:, None, None, :] @ probs).sum((1, 2))
        if with_output:
            out[:, :, start:stop] = probs.to(v.dtype) @ v[:, :, :stop]
    if not with_output:
        return total, None
    # the rest of LlamaDecoderLayer.forward: o_proj, residual, post-attention norm, MLP, residual
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    return total, hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def received_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    last_only: bool = False,
) -> torch.Tensor:
    """Attention each position receives in one LLaMA-style decoder layer, mean over heads and queries.

    Args:
        layer: a decoder layer with ``input_layernorm`` and ``self_attn`` (q/k projections).
        hidden: (B, S, C) the layer's input.
        position_embeddings: (cos, sin), each (B, S, d).
        mask: (B, S) padding mask.
        last_only: use only the last real query of each row (FastV's code) instead of all of them.

    Returns:
        (B, S) float32 mean over heads and real queries of softmax(QK^T / sqrt(d)) (causal, padding masked).
    """
    return _attend(layer, hidden, position_embeddings, mask, last_only)[0]


def layer_with_received_attention(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    cache=None,
    last_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LLaMA-style decoder layer's output and FastV's score from a single attention pass.

    The scored layer's softmax serves both its output (probs @ V) and the score, so FastV costs no
    second attention of layer K. Used in inference only (no dropout), on a prefill or a full forward.

    Args:
        layer: a decoder layer (``input_layernorm``, ``self_attn`` with q/k/v/o projections,
            ``post_attention_layernorm``, ``mlp``).
        hidden: (B, S, C) the layer's input.
        position_embeddings: (cos, sin), each (B, S, d).
        mask: (B, S) padding mask (causal attention over real keys).
        cache: the KV cache a prefill fills (the layer's own slot, empty before), or None.
        last_only: score from the last real query of each row only.

    Returns:
        (B, S, C) the layer's output (as ``layer(...)`` gives it) and the (B, S) float32 score.
    """
    scores, output = _attend(layer, hidden, position_embeddings, mask, last_only, cache, True)
    return output, scores


def fusable(layer: nn.Module) -> bool:
    """Whether ``layer`` has the LLaMA layout ``layer_with_received_attention`` recomputes."""
    attn = getattr(layer, "self_attn", None)
    parts = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim", "layer_idx")
    return (
        attn is not None
        and all(hasattr(attn, name) for name in parts)
        and all(hasattr(layer, name) for name in ("input_layernorm", "post_attention_layernorm", "mlp"))
        and getattr(attn, "sliding_window", None) is None
    )


def received(probs: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """FastV's score from an attention map: mean over heads, then over the chosen queries.

    Args:
        probs: (B, H, Q, S) attention probabilities of Q queries over S keys.
        queries: (B, Q) bool, the queries that count.

    Returns:
        (B, S) float32 attention each key receives (0 for a row without queries).
    """
    per_query = probs.float().mean(1) * queries[..., None]  # (B, Q, S)
    return per_query.sum(1) / queries.sum(1, keepdim=True).clamp(min=1)


def top_visual(scores: torch.Tensor, visual: torch.Tensor, keep: float) -> torch.Tensor:
    """Per row, the ``round(keep * m)`` visual tokens with the highest scores (ties: the earlier one).

    Args:
        scores: (B, S) scores (read on visual positions only).
        visual: (B, S) bool.
        keep: share of each row's m visual tokens to keep, in [0, 1].

    Returns:
        (B, S) bool kept visual tokens.
    """
    counts = torch.round(visual.sum(1).double() * keep).long()  # (B,)
    ranked = torch.where(visual, scores.double(), torch.full_like(scores, -torch.inf, dtype=torch.float64))
    order = torch.sort(ranked, dim=1, descending=True, stable=True).indices
    kept_sorted = torch.arange(scores.shape[1], device=scores.device)[None] < counts[:, None]
    return torch.zeros_like(visual).scatter(1, order, kept_sorted) & visual


class FastV(InLLMReduction):
    """FastV: after layer K, keep the ``keep`` share of visual tokens that layer K attends to most.

    Args:
        layer: K (1..L; L prunes nothing).
        keep: kept share of the visual tokens (1 - R; paper: 0.5).
        score: "mean" (the paper: attention received from all tokens) or "last" (the code: the last token's).
    """

    name = "fastv"

    def __init__(self, layer: int, keep: float = 0.5, score: str = "mean"):
        super().__init__(layer)
        if not 0.0 <= float(keep) <= 1.0:
            raise ReduceConfigError(f"reduce.keep={keep}: a share of the visual tokens, in [0, 1]")
        if score not in ("mean", "last"):
            raise ReduceConfigError(f"reduce.score={score!r}: mean (the paper) or last (FastV's code)")
        if layer < 1:
            raise ReduceConfigError(f"reduce.layer={layer}: FastV ranks by layer K's attention, K >= 1")
        self.keep, self.score = float(keep), score

    @property
    def label(self) -> str:
        """Row name with the settings."""
        score = ",score=last" if self.score == "last" else ""  # the paper's mean score is the default
        return f"fastv(K={self.layer},keep={self.keep:g}{score})"

    def settings(self) -> dict:
        """The settings behind the label."""
        return {"name": self.name, "layer": self.layer, "keep": self.keep, "score": self.score}

    def choose(self, layer, hidden, position_embeddings, mask, visual) -> torch.Tensor:
        """Top ``keep`` of the visual tokens by the attention layer K gives them."""
        if self.keep >= 1.0:
            return visual
        scores = received_attention(layer, hidden, position_embeddings, mask, self.score == "last")
        return top_visual(scores, visual, self.keep)

    def scored_layer(self, layer, hidden, position_embeddings, mask, visual, cache):
        """Layer K's output and the kept tokens from one attention pass (None: ``choose`` after the layer)."""
        if self.keep >= 1.0 or not fusable(layer):
            return None
        output, scores = layer_with_received_attention(
            layer, hidden, position_embeddings, mask, cache, self.score == "last"
        )
        return output, top_visual(scores, visual, self.keep)
