"""FocusLLaVA's text-guided sampler (METHOD 2.2): attention scores, cumulative-gamma selection, plans.

Pure functions over one decoder layer's own projections; no Hugging Face class is patched. The
pruned forward that uses them is ``focus_llm.PrunedLanguageModel``.

Layer convention: a selection layer ``i`` (1-based, 1 <= i < L) means layers 1..i see every visual
token, the attention of layer i scores them, and layers i+1..L see only the kept ones. So ``n``
tokens removed at layer ``i`` of ``L`` cost ``m - n + i * n / L`` equivalent tokens (METHOD 2.2),
and the paper's "layer 8 of 32" is ``i = 8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.models.llama.modeling_llama import repeat_kv

from avglab.core.decoder_parts import rope
from avglab.focus.regions import FocusConfigError


def resolve_layer(value: int | float, depth: int, key: str) -> int:
    """A selection layer as an absolute 1-based index: ints are absolute, floats are fractions of depth.

    Fractions round to the nearest layer and are clamped to [1, L-1], so the paper's 0.25 of 32 is 8
    and any fraction on a 2-layer LLM is layer 1.

    Raises:
        FocusConfigError: an absolute layer outside [1, L-1] or a fraction outside [0, 1].
    """
    if depth < 2:
        raise FocusConfigError(f"{key}: the text sampler needs an LLM with at least 2 layers, got {depth}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FocusConfigError(f"{key}={value!r}: give an int layer (1..{depth - 1}) or a float fraction")
    if isinstance(value, int):
        if not 1 <= value <= depth - 1:
            raise FocusConfigError(
                f"{key}={value}: an absolute layer must be in [1, {depth - 1}] for this {depth}-layer LLM "
                "(or give a fraction of depth such as 0.25)"
            )
        return value
    if not 0.0 <= value <= 1.0:
        raise FocusConfigError(f"{key}={value}: a fraction of depth must be in [0, 1]")
    return min(max(int(value * depth + 0.5), 1), depth - 1)


@dataclass
class TextPlan:
    """Where and how much each sample prunes.

    Attributes:
        layer: (B,) long selection layer i (1-based); 0 = this sample keeps every token.
        gamma: (B,) float cumulative score threshold (Eq. 9).
    """

    layer: torch.Tensor
    gamma: torch.Tensor


class TextSampler(nn.Module):
    """Settings of the text-guided sampler: a fixed layer and gamma, or stochastic ranges in training.

    Args:
        depth: L, decoder layers of the LLM.
        layer: selection layer at inference (int absolute or float fraction; paper: 8 of 32).
        gamma: threshold at inference (paper: 0.85).
        layer_range: [lo, hi] sampled per training sample (paper: [8, 24] of 32), or None.
        gamma_range: [lo, hi] sampled per training sample, or None.
        stochastic: sample layer and gamma per sample while ``self.training``.
    """

    def __init__(
        self,
        depth: int,
        layer: int | float = 0.25,
        gamma: float = 0.85,
        layer_range: Sequence[int | float] | None = (0.25, 0.75),
        gamma_range: Sequence[float] | None = (0.7, 0.95),
        stochastic: bool = True,
    ):
        super().__init__()
        self.depth = depth
        self.layer = resolve_layer(layer, depth, "focus.text.layer")
        self.gamma = check_gamma(gamma, "focus.text.gamma")
        self.stochastic = stochastic
        self.layer_range = self.gamma_range = None
        if layer_range is not None:
            if len(layer_range) != 2:
                raise FocusConfigError(f"focus.text.layer_range={list(layer_range)}: give [lo, hi]")
            lo, hi = (resolve_layer(v, depth, "focus.text.layer_range") for v in layer_range)
            if lo > hi:
                raise FocusConfigError(
                    f"focus.text.layer_range={list(layer_range)}: lo > hi (layers {lo}, {hi})"
                )
            self.layer_range = (lo, hi)
        if gamma_range is not None:
            if len(gamma_range) != 2 or gamma_range[0] > gamma_range[1]:
                raise FocusConfigError(f"focus.text.gamma_range={list(gamma_range)}: give [lo, hi], lo <= hi")
            self.gamma_range = tuple(check_gamma(g, "focus.text.gamma_range") for g in gamma_range)
        if stochastic and (self.layer_range is None or self.gamma_range is None):
            raise FocusConfigError("focus.text.stochastic=true needs focus.text.layer_range and gamma_range")

    def plan(self, batch_size: int, device: torch.device | None = None) -> TextPlan:
        """Per-sample layer and gamma: random in the ranges in training (Table 6), fixed otherwise."""
        if self.training and self.stochastic:
            lo, hi = self.layer_range
            layer = torch.randint(lo, hi + 1, (batch_size,))
            g_lo, g_hi = self.gamma_range
            gamma = g_lo + (g_hi - g_lo) * torch.rand(batch_size)
        else:
            layer = torch.full((batch_size,), self.layer, dtype=torch.long)
            gamma = torch.full((batch_size,), self.gamma)
        return TextPlan(layer.to(device), gamma.to(device))


def check_gamma(value: float, key: str) -> float:
    """Gamma must lie in (0, 1]; 1 keeps every visual token."""
    if not 0.0 < float(value) <= 1.0:
        raise FocusConfigError(f"{key}={value}: gamma is a share of the attention mass, in (0, 1]")
    return float(value)


def visual_attention_scores(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor,
    query_mask: torch.Tensor,
    visual_mask: torch.Tensor,
) -> torch.Tensor:
    """Eq. 8: attention of the text-prompt tokens to each visual token at one decoder layer.

    Uses the layer's own ``input_layernorm``, ``q_proj``, ``k_proj`` and rotary embedding, and only
    for the query rows it needs, so the layer itself still runs with its fast attention kernel.

    Args:
        layer: a LLaMA-style decoder layer (``input_layernorm`` and ``self_attn`` with q/k projections).
        hidden: (B, S, C) the layer's input hidden states.
        position_embeddings: (cos, sin), each (B, S, d), of the full sequence.
        attention_mask: (B, S) 1 on real tokens.
        query_mask: (B, S) text-prompt tokens used as queries.
        visual_mask: (B, S) visual tokens.

    Returns:
        (B, S) score: max over heads of softmax(QK^T/sqrt(d)), mean over the text tokens; 0 on
        non-visual positions and for samples without a query.
    """
    attn = layer.self_attn
    if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
        raise TypeError(f"the text sampler needs a LLaMA-style attention (q_proj, k_proj), got {type(attn)}")
    batch, seq, _ = hidden.shape
    normed = layer.input_layernorm(hidden)
    counts = query_mask.sum(1)
    q_index = pad_sequence([m.nonzero()[:, 0] for m in query_mask], batch_first=True)  # (B, Q)
    if q_index.shape[1] == 0:
        return hidden.new_zeros(batch, seq, dtype=torch.float32)
    q_valid = torch.arange(q_index.shape[1], device=hidden.device)[None] < counts[:, None]  # (B, Q)
    cos, sin = position_embeddings
    pick = q_index[..., None].expand(-1, -1, normed.shape[-1])
    q = attn.q_proj(normed.gather(1, pick)).view(batch, q_index.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(batch, seq, -1, attn.head_dim).transpose(1, 2)  # (B, Hkv, S, d)
    gather_d = q_index[..., None].expand(-1, -1, cos.shape[-1])
    q = rope(q, cos.gather(1, gather_d), sin.gather(1, gather_d))  # (B, H, Q, d)
    k = repeat_kv(rope(k, cos, sin), q.shape[1] // k.shape[1])  # (B, H, S, d)
    logits = (q @ k.transpose(-1, -2)).float() * attn.scaling  # (B, H, Q, S)
    keys = torch.arange(seq, device=hidden.device)
    allowed = attention_mask.bool()[:, None, :] & (keys[None, None, :] <= q_index[..., None])  # (B, Q, S)
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1)  # A per head
    return score_from_attention(probs, q_valid, visual_mask)


def score_from_attention(
    probs: torch.Tensor, query_valid: torch.Tensor, visual_mask: torch.Tensor
) -> torch.Tensor:
    """Eq. 8's reduction of an attention map: max over heads, then mean over the text queries.

    Args:
        probs: (B, H, Q, S) attention probabilities of Q text queries over all S keys.
        query_valid: (B, Q) real queries (padding rows are ignored).
        visual_mask: (B, S) visual tokens.

    Returns:
        (B, S) score per visual token, 0 elsewhere and for samples without a query.
    """
    per_query = probs.amax(dim=1) * query_valid[..., None]  # (B, Q, S): max over heads
    counts = query_valid.sum(1).clamp(min=1)[:, None].to(per_query.dtype)
    return per_query.sum(1) / counts * visual_mask  # mean over text tokens


def select_by_gamma(scores: torch.Tensor, visual_mask: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 9: per sample, the smallest set of visual tokens whose normalised cumulative score exceeds gamma.

    Sort descending (stable), normalise to sum 1 over the sample's visual tokens, and keep a
    token while the mass before it is at most gamma. gamma >= 1, or a sample whose scores are all
    zero (no query), keeps every visual token.

    Args:
        scores: (B, S) non-negative scores (only visual positions are read).
        visual_mask: (B, S) visual tokens.
        gamma: (B,) thresholds.

    Returns:
        (B, S) bool: True on kept visual tokens (False elsewhere).
    """
    s = torch.where(visual_mask, scores.double(), torch.full_like(scores, -1.0, dtype=torch.float64))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    sorted_s = s.gather(1, order).clamp(min=0.0)  # non-visual (-1) sort last and weigh 0
    total = sorted_s.sum(1, keepdim=True)
    mass_before = (sorted_s.cumsum(1) - sorted_s) / total.clamp(min=1e-300)  # exclusive cumsum
    keep_sorted = mass_before <= gamma.double()[:, None]
    keep_sorted |= (gamma[:, None] >= 1.0) | (total <= 0)
    keep = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return keep & visual_mask


def compact(keep: torch.Tensor, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Index map that gathers the kept positions of each row, re-padded.

    Args:
        keep: (B, S) bool positions to keep (real tokens only).
        padding_side: "right" or "left".

    Returns:
        index (B, S') into the old sequence (padding slots point at 0) and the new (B, S') mask.
    """
    counts = keep.sum(1)
    width = int(counts.max()) if len(counts) else 0
    if padding_side == "right":
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        mask = torch.arange(width, device=keep.device)[None] < counts[:, None]
    else:
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width :]
        mask = torch.arange(width, device=keep.device)[None] >= (width - counts)[:, None]
    index = torch.where(mask, order, torch.zeros_like(order))
    return index, mask.long()
