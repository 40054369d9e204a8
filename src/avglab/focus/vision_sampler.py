"""FocusLLaVA's vision-guided sampler (METHOD 2.1): region selector, Eq. 2 scaling and balance loss.

Works on projected features (LLM space), like AVG-LLaVA's scaler. Per image: the local tiles are
stitched and unpadded (``focus_regions.local_map``), split into w x w regions, every region is
max-pooled by every branch, a selector picks one branch per region, and the chosen cells are
packed in raster order with ``image_newline`` (see ``focus_regions``). The global view is kept
whole: it is the reference X_g the selector compares regions with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from avglab.data.anyres import num_tiles
from avglab.focus.regions import (
    FocusConfigError,
    add_newlines,
    gather_choice,
    local_map,
    make_branches,
    pool_regions,
)

SCALINGS = ("straight_through", "multiply")


@dataclass
class VisionSample:
    """The sampler's output for a batch.

    Attributes:
        visual: per sample, (n_b, C) packed visual tokens (None without an image).
        logits: (R, S) selector logits of every region of the batch.
        choice: (R,) chosen branch per region.
        region_owner: (R,) sample index of each region.
    """

    visual: list[torch.Tensor | None]
    logits: torch.Tensor
    choice: torch.Tensor
    region_owner: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        """(R, S) softmax of the selector logits."""
        return self.logits.float().softmax(-1)


def balance_loss(
    probs: torch.Tensor, choice: torch.Tensor, alpha: float, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Switch-Transformer-style balance loss (METHOD 2.1): ``alpha * sum_i w_i f_i P_i``.

    Args:
        probs: (R, S) branch probabilities of R regions.
        choice: (R,) chosen branch per region.
        alpha: loss weight (paper: 0.1).
        weights: (S,) imbalance weights w_i summing to S (None: all 1, the plain loss).

    Returns:
        Scalar; f_i (fraction routed to branch i) carries no gradient, P_i (mean probability) does.
        0 (with the graph) for R = 0.
    """
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    n = probs.shape[1]
    fraction = torch.bincount(choice, minlength=n).to(probs.dtype) / probs.shape[0]  # f_i
    mean_prob = probs.mean(dim=0)  # P_i
    w = probs.new_ones(n) if weights is None else torch.as_tensor(list(weights), dtype=probs.dtype)
    return alpha * (w.to(probs.device) * fraction * mean_prob).sum()


class VisionSampler(nn.Module):
    """Region selector over multi-scale max-pooled branches (METHOD 2.1, Eq. 2).

    Args:
        hidden_size: LLM embedding size C.
        grid: tokens per tile side g (the global view has g*g tokens).
        window: region side w in tokens (paper: 4).
        branches: output shapes per region, e.g. [[1, 1], [2, 2], [4, 4]].
        scaling: ``straight_through`` (default: forward value 1, gradient of the Top1 probability,
            so training and inference feed identical tokens) or ``multiply`` (Eq. 2 literally:
            tokens times the chosen probability, at training and inference).
    """

    def __init__(
        self,
        hidden_size: int,
        grid: int,
        window: int = 4,
        branches: Sequence[Sequence[int]] = ((1, 1), (2, 2), (4, 4)),
        scaling: str = "straight_through",
    ):
        super().__init__()
        if scaling not in SCALINGS:
            raise FocusConfigError(f"focus.vision.scaling={scaling!r}: choose one of {SCALINGS}")
        self.window = window
        self.branches = make_branches(branches, window)
        self.grid = grid
        self.scaling = scaling
        # FC layer of the selector: Score_i in R^{1 x HgWg} -> Z in R^S (METHOD 2.1).
        self.fc = nn.Linear(grid * grid, len(self.branches))
        self.force_branch: int | None = None  # tests and fixed-branch ablations

    @property
    def branch_names(self) -> list[str]:
        """Names like ``1x1`` in branch order."""
        return [b.name for b in self.branches]

    def region_logits(self, regions: torch.Tensor, global_view: torch.Tensor) -> torch.Tensor:
        """Selector logits of one image's regions.

        Args:
            regions: (R, C) region features pooled to 1x1.
            global_view: (C, g, g) projected global view X_g.

        Returns:
            (R, S) logits: FC(regions @ X_g^T). The inner products are divided by sqrt(C), like
            attention logits, so the FC starts in a sane range for any hidden size.
        """
        flat = global_view.flatten(1)  # (C, g*g)
        scores = regions @ flat / math.sqrt(regions.shape[-1])  # (R, g*g): Score_i
        return self.fc(scores.to(self.fc.weight.dtype))

    def scale(self, probs: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """(R,) factor on each region's tokens: Eq. 2's Top1(softmax(Z))."""
        top = probs.gather(1, choice[:, None])[:, 0]
        if self.scaling == "multiply":
            return top
        return 1.0 + top - top.detach()  # value 1, gradient of the Top1 probability

    def sample_image(
        self,
        tiles: torch.Tensor,
        image_size: Sequence[int],
        grid_pinpoints: list,
        tile_size: int,
        newline: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image.

        Args:
            tiles: (T, C, g, g) projected tiles (global view first).
            image_size: original (height, width).
            grid_pinpoints: AnyRes resolutions.
            tile_size: tile side in pixels.
            newline: (C,) ``image_newline``.

        Returns:
            packed tokens (g*g + n_cells + n_rows, C), region logits (R, S), choice (R,).
        """
        base = tiles[0].flatten(1).transpose(0, 1)  # (g*g, C) global view, kept whole
        if num_tiles(image_size, grid_pinpoints, tile_size) == 1:
            empty = base.new_zeros(0, len(self.branches))
            return torch.cat([base, newline[None].to(base)]), empty, empty.long()[:, 0]
        local = local_map(tiles, image_size, grid_pinpoints, tile_size)  # (C, H, W)
        pyramid = pool_regions(local, self.window, self.branches)
        logits = self.region_logits(pyramid.regions, tiles[0])  # (R, S)
        probs = logits.float().softmax(-1)
        choice = logits.argmax(-1)
        if self.force_branch is not None:
            choice = torch.full_like(choice, self.force_branch % len(self.branches))
        factor = self.scale(probs, choice)
        cells, rows = gather_choice(pyramid, choice, factor, self.window, self.branches)
        packed = add_newlines(cells, rows, newline)
        return torch.cat([base, packed]), logits, choice

    def forward(
        self,
        tiles: torch.Tensor,
        tile_owner: torch.Tensor,
        image_sizes: torch.Tensor,
        has_image: torch.Tensor,
        grid_pinpoints: list,
        tile_size: int,
        newline: torch.Tensor,
    ) -> VisionSample:
        """The batch.

        Args:
            tiles: (T_total, C, g, g) projected tiles of every image (None-free: call only with images).
            tile_owner: (T_total,) sample index of each tile.
            image_sizes: (B, 2) original (height, width).
            has_image: (B,) bool.
            grid_pinpoints: AnyRes resolutions.
            tile_size: tile side in pixels.
            newline: (C,) ``image_newline``.
        """
        owner = tile_owner.tolist()
        visual: list[torch.Tensor | None] = []
        logits, choices, region_owner = [], [], []
        for b, size in enumerate(image_sizes.tolist()):
            if not bool(has_image[b]):
                visual.append(None)
                continue
            start, stop = owner.index(b), len(owner) - owner[::-1].index(b)
            tokens, lg, ch = self.sample_image(tiles[start:stop], size, grid_pinpoints, tile_size, newline)
            visual.append(tokens)
            logits.append(lg)
            choices.append(ch)
            region_owner.append(torch.full((len(ch),), b, dtype=torch.long))
        n = len(self.branches)
        device = tiles.device if tiles is not None else newline.device
        return VisionSample(
            visual,
            torch.cat(logits) if logits else torch.zeros(0, n, device=device),
            torch.cat(choices) if choices else torch.zeros(0, dtype=torch.long, device=device),
            torch.cat(region_owner) if region_owner else torch.zeros(0, dtype=torch.long),
        )
