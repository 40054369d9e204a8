"""Stage 1 at a coarser granularity (probe only): ``stage.module=level_stage.LevelPretrainStage``.

``AVGLAB_PROBE_LEVEL`` (a level index, default 2 = 16 tokens per tile, 88 visual tokens for a 128x128
image instead of 336) is the level every training and validation step uses; a comma-separated list
(``3,4``) draws one of them per training step (validation: the first). Needs
``PYTHONPATH=experiments/spatial``.
"""

import os
import random

import torch

from avglab.stages.pretrain import PretrainStage


class LevelPretrainStage(PretrainStage):
    """Stage 1 at one coarser level (``AVGLAB_PROBE_LEVEL``, default 2) instead of the finest."""

    def answer_loss(self, batch: dict, split: str) -> torch.Tensor:
        """The answer loss at the probe's level (a training step draws one of the listed levels)."""
        levels = [int(v) for v in os.environ.get("AVGLAB_PROBE_LEVEL", "2").split(",")]
        self.level = random.choice(levels) if split == "train" else levels[0]
        return super().answer_loss(batch, split)
