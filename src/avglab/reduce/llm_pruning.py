"""A decoder run layer by layer that drops visual tokens once, after layer K (FastV, VTW).

Hugging Face's own decoder layers, rotary embedding, norm and ``create_causal_mask`` are called in
order, as ``LlamaModel.forward`` calls them; nothing is patched and every layer keeps its attention
kernel. After layer K the dropped positions leave the sequence (the batch is re-padded, kept tokens
keep their original position ids, as FastV's implementation does), so layers K+1..L and their KV
cache hold only the kept tokens; decoding reads each layer's cache with the mask of what it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from avglab.core.decoder_parts import causal_mask, run_layer

# (layer K's module, its input hidden (B, S, C), (cos, sin), mask (B, S), visual (B, S)) -> kept (B, S)
Chooser = Callable[[nn.Module, torch.Tensor, tuple, torch.Tensor, torch.Tensor], torch.Tensor]
# (layer K's module, its input, (cos, sin), mask, visual, cache) -> (layer K's output (B, S, C), kept (B, S)),
# or None where it cannot: runs layer K and scores it in one pass (FastV)
ScoredLayer = Callable[[nn.Module, torch.Tensor, tuple, torch.Tensor, torch.Tensor, object], tuple | None]


def compact(keep: torch.Tensor, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index of the kept positions of each row, re-padded on ``padding_side``.

    Args:
        keep: (B, S) bool, real tokens that stay.
        padding_side: "right" or "left".

    Returns:
        index (B, S') into the old rows (0 on padding slots) and the new (B, S') long mask.
    """
    counts = keep.sum(1)
    width = int(counts.max()) if len(counts) else 0
    if padding_side == "right":  # stable sorts keep the kept tokens in order
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        mask = torch.arange(width, device=keep.device)[None] < counts[:, None]
    else:
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, keep.shape[1] - width :]
        mask = torch.arange(width, device=keep.device)[None] >= (width - counts)[:, None]
    return torch.where(mask, order, torch.zeros_like(order)), mask.long()


@dataclass
class PrunedRun:
    """What a pruned pass leaves.

    Attributes:
        hidden: (B, S', C) normed last hidden states of the kept sequence.
        index: (B, S') original position of each kept slot (0 on padding).
        mask: (B, S') padding mask of the kept sequence.
        masks: per layer segment (first layer index, (B, S_seg) mask): the masks decoding extends.
        visual_per_layer: (B, L) visual tokens each layer saw.
        withdrawn: (B, S, C) without a cache: normed states at the input positions, a dropped one's from
            when it left (None if none left or with a cache).
    """

    hidden: torch.Tensor
    index: torch.Tensor
    mask: torch.Tensor
    masks: list[tuple[int, torch.Tensor]]
    visual_per_layer: torch.Tensor
    withdrawn: torch.Tensor | None


class LayerPrunedLM:
    """Wraps one decoder instance (e.g. ``llava.model.language_model``) for forwards pruned after layer K.

    Args:
        language_model: a Hugging Face decoder with ``layers``, ``norm``, ``rotary_emb``, ``config``.
        layer: K, the number of layers that see every visual token (K = L: nothing is pruned).
        choose: kept visual tokens from layer K's input (the method's rule); called without gradient.
        scored_layer: optional; in inference, runs layer K and gives the kept tokens in one pass
            (its output equals the layer's own), instead of the layer call plus ``choose``.
    """

    def __init__(
        self, language_model: nn.Module, layer: int, choose: Chooser, scored_layer: ScoredLayer | None = None
    ):
        for name in ("layers", "norm", "rotary_emb"):
            if not hasattr(language_model, name):
                raise TypeError(f"in-LLM reduction needs a decoder with `{name}`, got {type(language_model)}")
        self.lm, self.layer, self.choose, self.scored_layer = language_model, layer, choose, scored_layer
        self.depth = len(language_model.layers)

    def causal_mask(self, hidden, mask, positions, cache, layer_idx):
        """Transformers' mask for the configured kernel, sized on ``layer_idx``'s cache."""
        return causal_mask(self.lm, hidden, mask, positions, cache, layer_idx)

    def forward(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        visual: torch.Tensor,
        cache=None,
        padding_side: str = "right",
    ) -> PrunedRun:
        """Prefill (with ``cache``) or training/scoring forward (without), pruning after layer K.

        Args:
            embeds: (B, S, C) spliced inputs.
            mask: (B, S) padding mask.
            positions: (B, S) position ids over real tokens.
            visual: (B, S) bool, visual tokens.
            cache: a cache to fill for decoding, or None.
            padding_side: side the rows are padded on (kept after pruning).
        """
        batch, seq, _ = embeds.shape
        visual = visual.bool() & mask.bool()
        hidden, pos = embeds, positions
        index = torch.arange(seq, device=embeds.device).expand(batch, seq)
        per_layer = visual.sum(1, keepdim=True).repeat(1, self.depth)
        masks, withdrawn = [(0, mask)], None
        pe = self.lm.rotary_emb(hidden, position_ids=pos)
        causal = self.causal_mask(hidden, mask, pos, cache, 0)
        scored_input, chosen = hidden, None
        prunes = self.layer < self.depth and bool(visual.any())
        for j in range(self.depth + 1):
            if j == self.layer and prunes:
                keep = chosen
                if keep is None:
                    with torch.no_grad():  # a discrete choice: no gradient, as in both papers
                        keep = self.choose(self.lm.layers[max(j - 1, 0)], scored_input, pe, mask, visual)
                drop = visual & ~keep.bool()
                if bool(drop.any()):  # nothing dropped: the sequence (and its numbers) stay as they are
                    if cache is None and withdrawn is None:  # decoding never reads dropped positions
                        withdrawn = hidden
                    new_index, mask = compact(mask.bool() & ~drop, padding_side)
                    hidden = hidden.gather(1, new_index[..., None].expand(-1, -1, hidden.shape[-1]))
                    pos, visual, index = (t.gather(1, new_index) for t in (pos, visual, index))
                    visual = visual & mask.bool()
                    per_layer[:, j:] = visual.sum(1, keepdim=True)
                    pe = self.lm.rotary_emb(hidden, position_ids=pos)
                    causal = self.causal_mask(hidden, mask, pos, cache, j)
                    masks.append((j, mask))
            if j == self.depth:
                break
            scored_input = hidden  # layer j's input: FastV scores layer K's attention from it
            fused = None
            if (
                j == self.layer - 1
                and prunes
                and self.scored_layer is not None
                and not torch.is_grad_enabled()
            ):
                fused = self.scored_layer(self.lm.layers[j], hidden, pe, mask, visual, cache)
            if fused is None:
                hidden = run_layer(self.lm.layers[j], hidden, causal, pos, pe, cache)
            else:
                hidden, chosen = fused
        if withdrawn is not None:  # training/scoring: every input position's last state
            withdrawn = withdrawn.clone()
            rows = torch.arange(batch, device=hidden.device)[:, None].expand_as(index)
            real = mask.bool()
            withdrawn[rows[real], index[real]] = hidden[real]
            withdrawn = self.lm.norm(withdrawn)
        return PrunedRun(self.lm.norm(hidden), index, mask, masks, per_layer, withdrawn)

    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, run: PrunedRun, cache) -> torch.Tensor:
        """One decoding step on the cache ``forward`` filled; extends ``run.masks`` in place.

        Args:
            embeds: (B, 1, C) the last generated token.
            positions: (B, 1) its position.
            run: the prefill's result.
            cache: the cache the prefill filled.

        Returns:
            (B, 1, C) normed last hidden state.
        """
        ones = run.mask.new_ones(len(embeds), 1)
        causal = []
        for k, (start, mask) in enumerate(run.masks):  # every mask before any layer grows its cache
            run.masks[k] = (start, torch.cat([mask, ones], dim=1))
            causal.append(self.causal_mask(embeds, run.masks[k][1], positions, cache, start))
        starts = [start for start, _ in run.masks]
        pe = self.lm.rotary_emb(embeds, position_ids=positions)
        hidden = embeds
        for j in range(self.depth):
            segment = max(k for k, start in enumerate(starts) if start <= j)
            hidden = run_layer(self.lm.layers[j], hidden, causal[segment], positions, pe, cache)
        return self.lm.norm(hidden)
