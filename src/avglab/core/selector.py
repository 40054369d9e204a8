"""What a granularity selector receives and returns, and the two selectors that need no method.

The core calls ``selector(RouterInput) -> (B, N) logits`` over its N pooled levels (coarse to fine)
and feeds each sample the argmax level. AVG-LLaVA's router (``avglab.avg.router``) implements it; the
fixed and random selectors here are the baselines of Table 4 (a) and (b), so the core and its
baselines need no method package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterInput:
    """What a selector sees for a batch.

    Attributes:
        levels: per level l, (T_total, C, rows_l, cols_l) pooled tiles of every image in the batch.
        tile_owner: (T_total,) sample index of each tile.
        instruction: (B, Q, C) LLM input embeddings of the user's instruction tokens, zero-padded.
        instruction_mask: (B, Q) True on real instruction tokens (never on padding or system prompt).
        batch_size: B.
    """

    levels: list[torch.Tensor]
    tile_owner: torch.Tensor
    instruction: torch.Tensor
    instruction_mask: torch.Tensor
    batch_size: int


class FixedSelector(nn.Module):
    """Always the same granularity (ablation (a)); logits are one-hot scaled so argmax is the level."""

    def __init__(self, num_levels: int, level: int):
        super().__init__()
        if not -num_levels <= level < num_levels:
            raise ValueError(f"router.level={level} is outside the {num_levels} configured granularities")
        self.num_levels, self.level = num_levels, level % num_levels

    def forward(self, inputs: RouterInput) -> torch.Tensor:
        """(B, N) logits peaked at the fixed level."""
        device = inputs.tile_owner.device
        return F.one_hot(torch.full((inputs.batch_size,), self.level, device=device), self.num_levels).float()


class RandomSelector(nn.Module):
    """A uniformly random granularity per sample (ablation (b)), seeded for reproducibility."""

    def __init__(self, num_levels: int, seed: int = 0):
        super().__init__()
        self.num_levels = num_levels
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, inputs: RouterInput) -> torch.Tensor:
        """(B, N) one-hot logits of a random level per sample."""
        levels = torch.randint(self.num_levels, (inputs.batch_size,), generator=self.generator)
        return F.one_hot(levels, self.num_levels).float().to(inputs.tile_owner.device)
