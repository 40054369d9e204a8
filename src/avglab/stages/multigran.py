"""Stage 3: multi-granularity instruction tuning (Eq. 3)."""

from __future__ import annotations

import torch

from avglab.stages.base import StageModule


class MultiGranularityStage(StageModule):
    """Mean over the N granularities of the answer CE (Eq. 3).

    The vision encoder runs once per sample per step and the N variants of every sample go
    through the LLM as one batch (pitfall 6): ``AvgCore.all_levels``.
    """

    def all_level_loss(self, batch: dict, split: str) -> torch.Tensor:
        """Eq. 3 loss, plus the per-level answer CE for monitoring."""
        scores, _, loss = self.core.all_levels(batch)
        size = self.batch_size(batch)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size)
        for level, tokens in enumerate(self.core.scaler.granularities):
            self.log(f"{split}/ce_level_{tokens}", -scores[:, level].nanmean(), batch_size=size)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.all_level_loss(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.all_level_loss(batch, "val")
