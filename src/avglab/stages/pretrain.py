"""Stage 1: pretraining the projector on captions (Eq. 1), at the finest granularity or a configured one."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig

from avglab.core.core_output import CoreOutput
from avglab.core.model import AvgCore
from avglab.stages.base import StageModule


def listed(granularity: int | Sequence[int] | None) -> list:
    """``stage.granularity`` as a list: ``[None]`` (the finest), ``[g]``, or the list given."""
    return list(granularity) if isinstance(granularity, Sequence) else [granularity]


def granularity_error(granularity: int | Sequence[int] | None, granularities: list[int]) -> str | None:
    """What is wrong with ``stage.granularity`` (None: nothing): null, a scaler's granularity, or a list."""
    chosen = listed(granularity)
    if granularity is None or (chosen and all(g in granularities for g in chosen)):
        return None
    return (
        f"stage.granularity={granularity}: train at one of router.granularities {granularities} "
        "(tokens per tile), a list of them (taken in turn, step by step), or null for the finest"
    )


class PretrainStage(StageModule):
    """Next-token cross-entropy on the answer (caption) tokens given the image's visual tokens (Eq. 1).

    Every visual token by default (the paper). ``stage.granularity`` (tokens per tile, one of the
    scaler's) feeds every step the scaler's pooled tokens at that granularity instead: a tiny tower
    trained from random weights learns what several patches show together sooner that way
    (experiments/spatial/README.md). A list of granularities takes them in turn, one per optimizer
    step, and validates at the finest of them. ``stage.finest_steps`` trains the first that many steps at
    the finest level before ``stage.granularity`` takes over. Stage 2 trains the finest level, stage 3
    every level.
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        super().__init__(core, stage)
        granularities, granularity = list(core.scaler.granularities), stage.get("granularity")
        if wrong := granularity_error(granularity, granularities):
            raise ValueError(wrong)
        self.levels = [-1 if g is None else granularities.index(g) for g in listed(granularity)]
        self.level = max(self.levels, key=lambda level: level % len(granularities))  # validation: the finest
        self.finest_steps = int(stage.get("finest_steps") or 0)
        if self.finest_steps < 0:
            raise ValueError(f"stage.finest_steps={self.finest_steps}: give a number of steps, 0 or more")

    def train_level(self) -> int:
        """The level this optimizer step trains: the finest for ``stage.finest_steps``, then in turn."""
        if self.global_step < self.finest_steps:
            return -1
        return self.levels[(self.global_step - self.finest_steps) % len(self.levels)]

    def answer_output(self, batch: dict, split: str) -> CoreOutput:
        """The core's forward at this training step's level (:meth:`train_level`), or the validation level.

        Its answer CE and mean visual token count are logged under ``<split>/``.
        """
        level = self.train_level() if split == "train" else self.level
        out = self.core(batch, level=level)
        size = self.batch_size(batch)
        self.log(f"{split}/loss", out.loss, prog_bar=True, batch_size=size)
        self.log(f"{split}/visual_tokens_mean", out.visual_tokens.float().mean(), batch_size=size)
        return out

    def answer_loss(self, batch: dict, split: str) -> torch.Tensor:
        """Token-mean answer CE at the stage's level, logged."""
        return self.answer_output(batch, split).loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.keep_in_graph(self.answer_loss(batch, "train"), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.answer_loss(batch, "val")
