"""Stage 1 with a vision-side objective: every patch token also paints its neighbourhood.

A random vision tower trained by the answer loss alone gets a few scalar targets per image (one per
answer token), and on a tiny model they barely reach it: the LLM settles on the answer prior first and the
tower keeps what one patch shows (experiments/spatial/README.md measures it). This stage adds a dense,
label-free target that every image carries: from the token of patch (r, c) (the hidden state LLaVA-NeXT
feeds the projector, ``vision_feature_layer``), a linear head predicts the tile's pixels in the
(2R+1) x (2R+1) patches around it, average-pooled to cells of ``context_cell`` pixels (R =
``context_radius``; cells outside the tile are left out of the loss). A token can only do that by knowing
what its neighbours show and where they are, which is what shape, count and relative position need.

With ``context_mask`` > 0 the objective is masked instead (MAE's): each step also runs the tower once
more on the same tiles with that fraction of patches blanked (0, the normalised mean pixel), and only the
blanked patches' tokens are scored, so a token must infer what it covers from its neighbours: the course
of an edge through a hidden patch depends on the object's shape, where the unmasked form can be met from
the patch's own colours.

The head is the stage's own (it is not part of the core, so the stage output and every later stage are
plain LLaVA-NeXT weights); it trains at ``stage.lr``, and the objective adds ``context_weight`` times the
mean squared error (normalised pixels) to the answer loss. ``context_weight: 0`` is stage 1 as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from avglab.core.model import AvgCore
from avglab.stages.pretrain import PretrainStage


def context_targets(
    pixels: torch.Tensor, patch: int, radius: int, cell: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's pooled neighbourhood: (T, grid*grid, 3*w*w) targets and a (1, grid*grid, w*w) mask.

    Args:
        pixels: (T, 3, S, S) normalised tiles, as the vision tower reads them.
        patch: patch side P in pixels.
        radius: neighbourhood radius R in patches (window (2R+1) P pixels wide).
        cell: pooled cell side in pixels (divides P).

    The mask is 1 for the cells inside the tile (windows of border patches reach outside it).
    """
    tiles, channels, side, _ = pixels.shape
    margin = radius * patch
    pooled = F.avg_pool2d(F.pad(pixels, (margin,) * 4), cell)  # (T, 3, (S+2m)/cell, ...)
    inside = F.avg_pool2d(F.pad(pixels.new_ones(1, 1, side, side), (margin,) * 4), cell)
    width, stride = (2 * radius + 1) * patch // cell, patch // cell
    windows = F.unfold(pooled, width, stride=stride)  # (T, 3*w*w, grid*grid)
    mask = F.unfold(inside, width, stride=stride)  # (1, w*w, grid*grid)
    return windows.transpose(1, 2), (mask.transpose(1, 2) > 0.5).float()


def blank_patches(pixels: torch.Tensor, patch: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixels`` with a random ``ratio`` of patches set to 0 (the normalised mean pixel), and which were.

    Args:
        pixels: (T, 3, S, S) normalised tiles.
        patch: patch side P in pixels.
        ratio: chance of each patch to be blanked.

    Returns:
        (T, 3, S, S) blanked tiles and a (T, grid*grid) 0/1 float mask of the blanked patches.
    """
    tiles, grid = pixels.shape[0], pixels.shape[-1] // patch
    hidden = (torch.rand(tiles, grid * grid, device=pixels.device) < ratio).float()
    blank = hidden.view(tiles, 1, grid, grid).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return pixels * (1 - blank), hidden


class ContextPretrainStage(PretrainStage):
    """Stage 1 (Eq. 1) plus ``context_weight`` x the neighbourhood-painting loss on the vision tokens.

    Stage keys: ``context_weight`` (0 turns it off), ``context_radius`` (R, patches), ``context_cell``
    (pixels per pooled cell; divides the patch side), ``context_mask`` (fraction of patches blanked in the
    masked form; 0: every token paints what it sees).
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        super().__init__(core, stage)
        vision = core.config.vision_config
        self.patch = vision.patch_size
        self.radius = int(stage.get("context_radius", 2))
        self.cell = int(stage.get("context_cell", 4))
        self.weight = float(stage.get("context_weight", 1.0))
        self.mask_ratio = float(stage.get("context_mask", 0.0))
        if self.patch % self.cell or self.radius < 0 or self.weight < 0 or not 0 <= self.mask_ratio < 1:
            raise ValueError(
                f"stage.context_cell={self.cell} must divide the patch side {self.patch}; "
                f"stage.context_radius={self.radius} and stage.context_weight={self.weight} must be >= 0; "
                f"stage.context_mask={self.mask_ratio} must be in [0, 1)"
            )
        width = (2 * self.radius + 1) * self.patch // self.cell
        self.context_head = nn.Linear(vision.hidden_size, vision.num_channels * width * width)
        self._seen: dict[str, torch.Tensor] = {}
        self._masked_pass = False
        tower = core.llava.model.vision_tower
        tower.register_forward_hook(self._keep_tokens, with_kwargs=True)

    def _keep_tokens(self, module, args, kwargs, output) -> None:
        """Keeps the tower's input tiles and the feature layer's patch tokens of the current forward."""
        if self.weight == 0 or self._masked_pass:
            return
        pixels = args[0] if args else kwargs["pixel_values"]
        self._seen = {"pixels": pixels, "tokens": self.patch_tokens(output)}

    def patch_tokens(self, output) -> torch.Tensor:
        """(T, grid*grid, D) patch tokens of a tower output at LLaVA-NeXT's feature layer (CLS dropped)."""
        layer = self.core.config.vision_feature_layer
        return output.hidden_states[layer if isinstance(layer, int) else layer[-1]][:, 1:]

    def masked_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's patch tokens of ``pixels`` with random patches blanked, and which were.

        Args:
            pixels: (T, 3, S, S) tiles of the last forward.

        Returns:
            (T, grid*grid, D) tokens and a (T, grid*grid) 0/1 float mask of the blanked patches.
        """
        blanked, hidden = blank_patches(pixels, self.patch, self.mask_ratio)
        self._masked_pass = True  # not the model's own forward: _keep_tokens leaves it out
        try:
            out = self.core.llava.model.vision_tower(blanked, output_hidden_states=True)
        finally:
            self._masked_pass = False
        return self.patch_tokens(out), hidden

    def context_loss(self) -> torch.Tensor | None:
        """Masked MSE of the head's neighbourhood prediction on the last forward's tiles (None: no image)."""
        seen, self._seen = self._seen, {}
        if not seen:
            return None
        pixels = seen["pixels"].detach()
        targets, mask = context_targets(pixels, self.patch, self.radius, self.cell)
        tokens, scored = seen["tokens"], torch.ones_like(targets[..., 0])
        if self.mask_ratio:
            tokens, scored = self.masked_tokens(pixels)
        predicted = self.context_head(tokens)  # (T, grid*grid, 3*w*w)
        channels = pixels.shape[1]
        cells = mask * scored.unsqueeze(-1)  # (T, grid*grid, w*w): inside the tile, on a scored token
        error = (predicted - targets).pow(2).unflatten(-1, (channels, -1)) * cells.unsqueeze(2)
        return error.sum() / (cells.sum().clamp(min=1) * channels)

    def step_loss(self, batch: dict, split: str) -> torch.Tensor:
        """Answer CE at the stage's level plus the weighted context loss, both logged."""
        loss = self.answer_loss(batch, split)
        context = self.context_loss()
        if context is not None:
            self.log(f"{split}/context_loss", context, batch_size=self.batch_size(batch))
            loss = loss + self.weight * context
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch, "train")
        if not bool(batch["has_image"].any()):  # the head gets an exact zero (DDP)
            loss = self.heads_in_graph(loss)
        return self.keep_in_graph(loss, batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step_loss(batch, "val")

    def stage_heads(self) -> dict[str, nn.Module]:
        """The context head, while the objective is on."""
        return {"context_head": self.context_head} if self.weight else {}
