"""What every training stage shares: freezing from the stage config, optimizer and schedule."""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_cosine_schedule_with_warmup

from avglab.model.core import AvgCore

log = logging.getLogger(__name__)
PARTS = ("vision", "projector", "newline", "llm", "router")


def part_parameters(core: AvgCore, part: str) -> list[torch.nn.Parameter]:
    """Parameters of one named part of the core."""
    model = core.llava.model
    if part == "vision":
        return list(model.vision_tower.parameters())
    if part == "projector":
        return list(model.multi_modal_projector.parameters())
    if part == "newline":
        return [model.image_newline]
    if part == "llm":
        return list(model.language_model.parameters()) + list(core.llava.lm_head.parameters())
    if part == "router":
        return list(core.selector.parameters()) if core.selector is not None else []
    raise ValueError(f"stage.train: unknown part {part!r}; choose from {list(PARTS)}")


class StageModule(L.LightningModule):
    """Base LightningModule of a training stage over the shared core.

    Args:
        core: the shared model core.
        stage: the ``stage`` config node (train parts, lr, lr_vision, weight_decay, warmup_ratio).
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        super().__init__()
        self.core = core
        self.stage = stage
        self.freeze_by_config()

    def freeze_by_config(self) -> None:
        """Trains exactly the parts listed in ``stage.train`` (METHOD 1.3 per stage)."""
        for p in self.core.parameters():
            p.requires_grad_(False)
        for part in self.stage.train:
            for p in part_parameters(self.core, part):
                p.requires_grad_(True)
        if not any(p.requires_grad for p in self.core.parameters()):
            raise ValueError(f"stage.train={list(self.stage.train)} leaves nothing to train in this model")

    def parameter_counts(self) -> dict[str, int]:
        """Trainable and total parameters (also logged at fit start)."""
        total = sum(p.numel() for p in self.core.parameters())
        trainable = sum(p.numel() for p in self.core.parameters() if p.requires_grad)
        return {"params/trainable": trainable, "params/total": total}

    def on_fit_start(self) -> None:
        counts = self.parameter_counts()
        log.info(
            "stage %s trains %s: %d of %d parameters",
            self.stage.name,
            list(self.stage.train),
            counts["params/trainable"],
            counts["params/total"],
        )
        if self.logger is not None:
            self.logger.log_metrics({k: float(v) for k, v in counts.items()}, step=0)

    def on_train_epoch_start(self) -> None:
        # Frozen parts stay in eval mode so dropout never perturbs the feedback they give.
        for part in PARTS:
            if part in self.stage.train or part == "newline":
                continue
            for module in self.frozen_modules(part):
                module.eval()

    def frozen_modules(self, part: str) -> list[torch.nn.Module]:
        """Modules of a part (for switching frozen parts to eval mode)."""
        model = self.core.llava.model
        return {
            "vision": [model.vision_tower],
            "projector": [model.multi_modal_projector],
            "llm": [model.language_model, self.core.llava.lm_head],
            "router": [self.core.selector] if self.core.selector is not None else [],
        }[part]

    def configure_optimizers(self):
        """AdamW (no decay on biases and norms), linear warmup then cosine, stepped per batch."""
        groups = []
        for part in self.stage.train:
            params = [p for p in part_parameters(self.core, part) if p.requires_grad]
            lr = self.stage.lr_vision if part == "vision" and self.stage.lr_vision else self.stage.lr
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.stage.weight_decay},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0},
            ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.stage.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def batch_size(self, batch: dict) -> int:
        """Samples in a batch (for Lightning's logging)."""
        return len(batch["input_ids"])
