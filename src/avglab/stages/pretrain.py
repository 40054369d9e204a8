"""Stage 1: pretraining the projector on captions (Eq. 1), finest granularity."""

from __future__ import annotations

import torch

from avglab.stages.base import StageModule


class PretrainStage(StageModule):
    """Next-token cross-entropy on the answer (caption) tokens with every visual token (Eq. 1)."""

    def finest_loss(self, batch: dict, split: str) -> torch.Tensor:
        """Token-mean answer CE at the finest level, logged with the visual token count."""
        out = self.core(batch, level=-1)
        size = self.batch_size(batch)
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{split}/visual_tokens_mean", out.visual_tokens.float().mean(), batch_size=size)
        return out.loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.keep_in_graph(self.finest_loss(batch, "train"), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.finest_loss(batch, "val")
