"""What the core hands between its steps: the encoded pyramid of a batch and a routed forward's result."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avglab.core.splice import Spliced


@dataclass
class Encoded:
    """Vision features of a batch at every granularity.

    Attributes:
        levels: per level, (T_total, C, rows_l, cols_l) pooled projected tiles.
        tile_owner: (T_total,) sample index of each tile.
        has_image: (B,) samples that carry an image.
    """

    levels: list[torch.Tensor]
    tile_owner: torch.Tensor
    has_image: torch.Tensor

    def rows(self, rows: torch.Tensor) -> Encoded:
        """The pyramid of the samples ``rows`` (ascending (R,) indices), renumbered 0..R-1."""
        owner = self.tile_owner
        renumber = torch.full((len(self.has_image),), -1, dtype=torch.long, device=owner.device)
        renumber[rows.to(owner.device)] = torch.arange(len(rows), device=owner.device)
        kept = renumber[owner]
        keep = kept >= 0
        return Encoded([lvl[keep.to(lvl.device)] for lvl in self.levels], kept[keep], self.has_image[rows])


def batch_rows(batch: dict, rows: torch.Tensor) -> dict:
    """The samples ``rows`` of a collate batch: every tensor and list indexed on its batch axis."""
    index = rows.tolist()
    return {
        k: v[rows.to(v.device)] if isinstance(v, torch.Tensor) else [v[i] for i in index]
        for k, v in batch.items()
    }


@dataclass
class CoreOutput:
    """Result of a routed forward.

    Attributes:
        levels: (B,) chosen granularity index per sample (-1 without image).
        visual_tokens: (B,) visual tokens fed to the LLM per sample, newlines included.
        router_logits: (B, N), or None without a selector or with a forced level.
        answer_logprob: (B,) mean log-probability of the answer tokens (NaN where none).
        answer_tokens: (B,) number of supervised tokens per sample.
        loss: token-mean answer cross-entropy over the batch (0 if no answer token).
        logits: (B, S, V) full logits, only when requested.
        spliced: the LLM inputs.
    """

    levels: torch.Tensor
    visual_tokens: torch.Tensor
    router_logits: torch.Tensor | None
    answer_logprob: torch.Tensor
    answer_tokens: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor | None
    spliced: Spliced
