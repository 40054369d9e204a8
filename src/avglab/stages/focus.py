"""FocusLLaVA one-stage instruction tuning (METHOD 2.2): answer CE + balance loss, stochastic text sampler."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from avglab.focus.model import FocusCore, FocusOutput
from avglab.stages.base import StageModule


class FocusStage(StageModule):
    """Instruction tuning with the configured FocusLLaVA samplers in the loop.

    The answer CE flows through the kept tokens; the vision selector learns through Eq. 2's
    Top1 scaling and the balance loss (already weighted by alpha); in training the text sampler
    draws a layer and gamma per sample (``focus.text.stochastic``), in validation it uses the
    fixed ones.

    Args:
        core: a ``FocusCore`` (``focus=vision|text|both``).
        stage: the stage config (train parts, lr, ...); part ``router`` is the vision selector.
    """

    def __init__(self, core: FocusCore, stage: DictConfig):
        if not isinstance(core, FocusCore):
            raise ValueError("stage=focus trains FocusLLaVA: choose focus=vision, focus=text or focus=both")
        super().__init__(core, stage)

    def log_focus(self, out: FocusOutput, split: str, size: int) -> None:
        """Token accounting (first layer and layer-weighted) and the vision selector's branch shares."""
        self.log(f"{split}/visual_tokens_mean", out.visual_tokens.float().mean(), batch_size=size)
        self.log(f"{split}/visual_tokens_equivalent_mean", out.equivalent_tokens.mean(), batch_size=size)
        self.log(f"{split}/visual_tokens_removed_in_llm_mean", out.removed.float().mean(), batch_size=size)
        vision = self.core.vision
        if out.vision is not None and len(out.vision.choice):
            share = torch.bincount(out.vision.choice, minlength=len(vision.branches)).float()
            share = share / share.sum()
            for name, value in zip(vision.branch_names, share.tolist(), strict=True):
                self.log(f"{split}/branch_share_{name}", value, batch_size=size)

    def focus_step(self, batch: dict, split: str) -> tuple[torch.Tensor, FocusOutput]:
        """Answer CE + balance loss on one batch.

        Text-only samples get the answer CE like any other; they have no regions, so they add
        nothing to the balance loss or the branch shares (a batch without regions: balance 0).
        """
        out = self.core(batch)
        loss = out.loss + out.balance_loss
        size = self.batch_size(batch)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=size)
        self.log(f"{split}/loss_ce", out.loss, batch_size=size)
        self.log(f"{split}/loss_balance", out.balance_loss, batch_size=size)
        self.log_focus(out, split, size)
        return loss, out

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, out = self.focus_step(batch, "train")
        # No region in the batch (text-only or single-tile images): the selector saw nothing.
        idle = out.vision is None or not len(out.vision.choice)
        return self.keep_in_graph(loss, batch, ("router",) if idle else ())

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.focus_step(batch, "val")
