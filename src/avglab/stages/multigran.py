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
        """Eq. 3 loss, plus the per-level answer CE for monitoring.

        Text-only samples train the LLM like any other (their N variants are one sequence, so
        their mean CE over levels is their CE); the per-level CE is over samples with an image,
        where the levels differ, and text-only samples get their own ``ce_text_only``.
        """
        scores, _, loss = self.core.all_levels(batch)
        size = self.batch_size(batch)
        has_image = batch["has_image"].to(scores.device)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size)
        if has_image.any():
            for level, tokens in enumerate(self.core.scaler.granularities):
                ce = -scores[has_image, level].nanmean()
                self.log(f"{split}/ce_level_{tokens}", ce, batch_size=int(has_image.sum()))
        if not has_image.all():
            ce = -scores[~has_image, -1].nanmean()  # every level alike: one sequence
            self.log(f"{split}/ce_text_only", ce, batch_size=int((~has_image).sum()))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.keep_in_graph(self.all_level_loss(batch, "train"), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.all_level_loss(batch, "val")
