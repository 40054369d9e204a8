"""FastV (Chen et al. 2024, "An Image is Worth 1/2 Tokens After Layer 2"): attention-ranked LLM pruning.

After layer K (paper: K = 2) only the top ``keep`` share of the visual tokens (paper: R = 50% pruned,
keep = 0.5) go on, ranked by the attention they receive in layer K: per the paper, the average over
heads of the attention each token receives from all tokens (``score=mean``); FastV's public code
ranks by the last token's row instead (``score=last``). The attention probabilities of that one layer
are computed here from the layer's own projections; every layer still runs its configured kernel.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import repeat_kv

from avglab.core.decoder_parts import rope
from avglab.reduce.base import InLLMReduction, ReduceConfigError

QUERY_CHUNK = 512  # queries per attention block: (B, H, 512, <= S) floats at a time, not (B, H, S, S)


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
    attn = layer.self_attn
    batch, seq, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    cos, sin = position_embeddings
    q = attn.q_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    k = repeat_kv(k, q.shape[1] // k.shape[1])  # (B, H, S, d)
    real = mask.bool()
    if last_only:  # the last real query per row: its index is the last 1 of the mask
        last = seq - 1 - real.flip(1).int().argmax(1)
        queries = torch.zeros_like(real).scatter(1, last[:, None], True)
    else:
        queries = real
    # each chosen query's weight in the mean over heads and chosen queries
    weights = queries.float() / (queries.sum(1, keepdim=True).clamp(min=1) * q.shape[1])  # (B, S)
    padded = not bool(real.all())
    lowest = torch.finfo(torch.float32).min  # not -inf: a padding query's all-masked row stays finite
    total = torch.zeros(batch, seq, dtype=torch.float32, device=hidden.device)
    for start in range(0, seq, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, seq)
        chunk = weights[:, start:stop]  # (B, n)
        if not bool(chunk.any()):
            continue
        # causal: the queries of [start, stop) see keys < stop only, so the rest is never computed
        scaled = q[:, :, start:stop] * attn.scaling
        logits = (scaled @ k[:, :, :stop].transpose(-1, -2)).float()  # (B, H, n, stop)
        future = torch.ones(stop - start, stop - start, dtype=torch.bool, device=hidden.device).triu(1)
        logits[..., start:stop].masked_fill_(future, lowest)
        if padded:
            logits.masked_fill_(~real[:, None, None, :stop], lowest)
        # the chunk's weighted sum over queries as a batched gemv, then over heads: (B, H, 1, stop)
        total[:, :stop] += (chunk[:, None, None, :] @ logits.softmax(-1)).sum((1, 2))
    return total


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
