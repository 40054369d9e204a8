"""The LLM forward with FocusLLaVA's in-LLM pruning (METHOD 2.2), for training, prefill and decoding.

Runs a Hugging Face decoder (``embed -> layers -> norm``) layer by layer through the model's own
modules; nothing is patched. Every layer keeps its configured attention kernel (sdpa, flash, ...):
only at a sample's selection layer are attention probabilities computed, by hand, for the text
queries (``focus_text.visual_attention_scores``). After that layer the dropped visual tokens are
removed and the batch is re-padded, keeping the original position ids, so later layers (and
their KV cache) hold only the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache

from avglab.core.decoder_parts import causal_mask, run_layer
from avglab.focus.text_sampler import TextPlan, compact, select_by_gamma, visual_attention_scores


@dataclass
class Segment:
    """Consecutive layers that saw the same sequence.

    Attributes:
        start: index (0-based) of the first layer of the segment.
        attention_mask: (B, S_seg) padding mask of that sequence (grows while decoding).
    """

    start: int
    attention_mask: torch.Tensor


@dataclass
class PrunedState:
    """Result of a pruned forward.

    Attributes:
        hidden: (B, S', C) final (normed) hidden states of the kept sequence.
        attention_mask: (B, S') its padding mask.
        position_ids: (B, S') original positions of the kept tokens.
        labels: (B, S') or None.
        index: (B, S') position of each kept token in the input sequence (0 on padding).
        kept_visual: (B, S) bool over the input sequence: visual tokens that reach the last layer.
        removed: (B,) visual tokens removed per sample (n).
        layer: (B,) selection layer that pruned each sample (0 = none).
        segments: layer segments and their masks, for decoding with the cache.
    """

    hidden: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor
    kept_visual: torch.Tensor
    removed: torch.Tensor
    layer: torch.Tensor
    segments: list[Segment] = field(default_factory=list)


def equivalent_tokens(
    visual: torch.Tensor, removed: torch.Tensor, layer: torch.Tensor, depth: int
) -> torch.Tensor:
    """Layer-weighted visual token count ``m - n + i * n / L`` (METHOD 2.2), (B,) float."""
    return visual.float() - removed.float() + layer.float() * removed.float() / depth


class PrunedLanguageModel:
    """Wraps one decoder instance (e.g. ``llava.model.language_model``) for pruned forwards.

    Args:
        language_model: a Hugging Face decoder model with ``layers``, ``norm``, ``rotary_emb``.
    """

    def __init__(self, language_model: torch.nn.Module):
        for name in ("layers", "norm", "rotary_emb"):
            if not hasattr(language_model, name):
                raise TypeError(f"the text sampler needs a decoder with `{name}`, got {type(language_model)}")
        self.lm = language_model
        self.depth = len(language_model.layers)

    def causal_mask(self, hidden, attention_mask, position_ids, cache, layer_idx):
        """Transformers' own mask for the configured attention kernel, sized on ``layer_idx``'s cache."""
        return causal_mask(self.lm, hidden, attention_mask, position_ids, cache, layer_idx)

    def forward(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        visual_mask: torch.Tensor,
        query_mask: torch.Tensor,
        plan: TextPlan,
        labels: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        padding_side: str = "right",
        forced_keep: torch.Tensor | None = None,
    ) -> PrunedState:
        """Forward with per-sample pruning after each sample's selection layer (Eqs. 8-9).

        Args:
            embeds: (B, S, C) spliced input embeddings.
            attention_mask: (B, S) padding mask.
            position_ids: (B, S) positions over real tokens.
            visual_mask: (B, S) visual tokens.
            query_mask: (B, S) text-prompt tokens (the user's instruction).
            plan: per-sample selection layer and gamma.
            labels: (B, S) or None, gathered along with the kept tokens.
            cache: a ``DynamicCache`` to fill (prefill), or None (training).
            padding_side: side to re-pad on ("left" for batched generation).
            forced_keep: (B, S) kept visual tokens to use instead of the scores (tests).
        """
        batch, seq = attention_mask.shape
        device = embeds.device
        hidden, mask, pos = embeds, attention_mask, position_ids
        vis, query = visual_mask.bool(), query_mask.bool()
        index = torch.arange(seq, device=device).expand(batch, seq)
        removed = torch.zeros(batch, dtype=torch.long, device=device)
        layers = plan.layer.to(device)
        segments = [Segment(0, mask)]
        pe = self.lm.rotary_emb(hidden, position_ids=pos)
        causal = self.causal_mask(hidden, mask, pos, cache, 0)
        for j, layer in enumerate(self.lm.layers):
            # the last layer never prunes: nothing after it would see fewer tokens
            here = (layers == j + 1) & vis.any(1) & (j + 1 < self.depth)
            if bool(here.any()) and forced_keep is None:
                with torch.no_grad():  # Eq. 8 on this layer only; selection is discrete, no gradient
                    scores = visual_attention_scores(layer, hidden, pe, mask, query & here[:, None], vis)
            hidden = run_layer(layer, hidden, causal, pos, pe, cache)
            if not bool(here.any()):
                continue
            candidates = vis & here[:, None]
            if forced_keep is None:
                keep_visual = select_by_gamma(scores, candidates, plan.gamma.to(device))
            else:
                keep_visual = forced_keep.to(device).gather(1, index) & candidates
            drop = candidates & ~keep_visual
            removed = removed + drop.sum(1)
            new_index, mask = compact(mask.bool() & ~drop, padding_side)
            hidden = hidden.gather(1, new_index[..., None].expand(-1, -1, hidden.shape[-1]))
            pos, vis, query = (t.gather(1, new_index) for t in (pos, vis, query))
            vis, query = vis & mask.bool(), query & mask.bool()
            if labels is not None:
                labels = labels.gather(1, new_index).masked_fill(~mask.bool(), -100)
            index = index.gather(1, new_index)
            pe = self.lm.rotary_emb(hidden, position_ids=pos)
            causal = self.causal_mask(hidden, mask, pos, cache, j + 1)
            segments.append(Segment(j + 1, mask))
        kept = torch.zeros(batch, seq, dtype=torch.long, device=device).scatter_add_(1, index, vis.long())
        layer_used = torch.where(removed > 0, layers, torch.zeros_like(layers))
        return PrunedState(
            self.lm.norm(hidden),
            mask,
            pos,
            labels,
            index,
            (kept > 0) & visual_mask.bool(),
            removed,
            layer_used,
            segments,
        )

    def decode(
        self, embeds: torch.Tensor, position_ids: torch.Tensor, state: PrunedState, cache: DynamicCache
    ) -> torch.Tensor:
        """One decoding step on the cache filled by ``forward`` (layers after pruning hold kept tokens only).

        Args:
            embeds: (B, 1, C) embedding of the last generated token.
            position_ids: (B, 1) its position.
            state: the prefill state; its segment masks are extended in place.
            cache: the cache.

        Returns:
            (B, 1, C) final normed hidden state.
        """
        ones = state.attention_mask.new_ones(len(embeds), 1)
        masks = []
        for segment in state.segments:  # all masks before any layer grows its cache
            segment.attention_mask = torch.cat([segment.attention_mask, ones], dim=1)
            masks.append(self.causal_mask(embeds, segment.attention_mask, position_ids, cache, segment.start))
        starts = [s.start for s in state.segments]
        pe = self.lm.rotary_emb(embeds, position_ids=position_ids)
        hidden = embeds
        for j, layer in enumerate(self.lm.layers):
            which = max(k for k, start in enumerate(starts) if start <= j)
            hidden = run_layer(layer, hidden, masks[which], position_ids, pe, cache)
        return self.lm.norm(hidden)
