"""Exponential moving average of a stage's trainable parameters (``stage.ema_decay``).

Lightning's ``EMAWeightAveraging`` averages a copy of the whole LightningModule; in stage 4 that
would copy and update the frozen LMM too (7B parameters to average a router of ~1.66% of them).
This callback keeps the average of the parameters that require a gradient only, with torch's own
EMA update (``torch.optim.swa_utils.get_ema_multi_avg_fn``), and, like Lightning's, validates
with the averaged weights, leaves them in the module when training ends and resumes from
``ckpt_path`` with the average intact.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class TrainableEMA(L.Callback):
    """EMA of the trainable parameters, updated after every optimizer step.

    Args:
        decay: weight of the running average per step (the average forgets with a time constant
            of about 1 / (1 - decay) steps).
    """

    def __init__(self, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"stage.ema_decay={decay}: must be in (0, 1), or null for no averaging")
        self.update = get_ema_multi_avg_fn(decay)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []  # the trained parameters, found once per fit
        self.average: list[torch.Tensor] = []
        self.latest_step = 0
        self.restored: dict | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trained = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in trained], [p for _, p in trained]
        self.average = [p.detach().clone() for p in self.params]
        if self.restored is not None:  # resuming: the average saved with the checkpoint
            self.load_average(self.restored)
            self.restored = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step > self.latest_step:  # after an optimizer step, not every micro batch
            self.update(self.average, [p.detach() for p in self.params], trainer.global_step)
            self.latest_step = trainer.global_step

    def swap(self) -> None:
        """Exchanges the module's trainable parameters with the average."""
        with torch.no_grad():
            for param, average in zip(self.params, self.average, strict=True):
                held = param.detach().clone()
                param.copy_(average)
                average.copy_(held)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self.average:
            self.swap()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and self.average:
            self.swap()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The averaged weights become the stage's output."""
        with torch.no_grad():
            for param, average in zip(self.params, self.average, strict=True):
                param.copy_(average)

    def state_dict(self) -> dict:
        return {"latest_step": self.latest_step, "average": dict(zip(self.names, self.average, strict=True))}

    def load_state_dict(self, state_dict: dict) -> None:
        self.restored = state_dict  # applied in on_fit_start, once the trainable names are known

    def load_average(self, state: dict) -> None:
        missing = [n for n in self.names if n not in state["average"]]
        if missing:
            raise ValueError(
                f"the checkpoint's EMA has no average of {missing[:3]}: it was trained with other stage.train"
            )
        self.average = [state["average"][n].clone() for n in self.names]
        self.latest_step = state["latest_step"]
