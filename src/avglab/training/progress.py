"""Progress a user can watch: Lightning's bar in a terminal, a log line every N steps elsewhere.

A job writing to a file (a cluster job, ``make demo > log``, Hydra's ``<run dir>/<task>.log``) cannot
show a bar, so :class:`ProgressLog` writes one line every ``every`` optimizer steps (training) or
batches (evaluation) through ``logging``, i.e. once to the console and once to the run's log file:
step, loss, learning rate, samples/s and the ETA. Only rank 0 writes (under DDP the other ranks
would repeat the same line).
"""

from __future__ import annotations

import logging
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from avglab.data.rates import RateMeter

log = logging.getLogger(__name__)
MODES = ("auto", "bar", "log", "off")


def batch_samples(batch) -> int:
    """Samples in a batch: the leading size of its first tensor (0 when it holds none)."""
    values = (
        batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else [batch]
    )
    return next((len(v) for v in values if isinstance(v, torch.Tensor) and v.dim() > 0), 0)


class ProgressLog(L.Callback):
    """A log line every ``every`` training steps and evaluation batches (rank 0 only).

    Training: ``step 40/300 (13%) loss 3.214 lr 1.0e-03 samples/s 41.2 ETA 1m05s`` where loss is the
    stage's ``train/loss`` as logged at that step, lr is the first parameter group's (the others
    are in TensorBoard), and samples/s counts this rank's samples times the world size, since the
    second step. Evaluation: ``eval batch 20 (640/2000 samples, 32%) samples/s ... ETA ...`` (all
    ranks' samples; the total is the test split's count in the converter's manifests).
    """

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"progress_every={every}: must be >= 1")
        self.every = every
        self.train, self.eval, self.eval_samples = RateMeter(), RateMeter(), 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Starts the training clock."""
        self.train = RateMeter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        """Counts the batch's samples; logs a line every ``every`` optimizer steps."""
        step = trainer.global_step
        self.train.update(step, batch_samples(batch) * trainer.world_size)
        if not trainer.is_global_zero or step == 0 or step % self.every or step == getattr(self, "_last", -1):
            return
        self._last = step  # with gradient accumulation several batches end on the same step
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        speed, eta = self.train.rates(step, total)
        loss = trainer.callback_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        parts = [f"step {step}/{total}" + (f" ({100 * step / total:.0f}%)" if total else "")]
        parts += [f"loss {float(loss):.4f}"] if loss is not None else []
        parts += [f"lr {lr:.2e}"] if lr is not None else []
        parts += [f"samples/s {speed}", f"ETA {eta}"]
        log.info(" ".join(parts))

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Starts the evaluation clock."""
        self.eval, self.eval_samples = RateMeter(), 0

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        """Counts the batch's samples; logs a line every ``every`` batches."""
        done = batch_idx + 1
        samples = batch_samples(batch) * trainer.world_size
        self.eval_samples += samples
        self.eval.update(self.eval_samples, samples)
        if not trainer.is_global_zero or done % self.every:
            return
        size = getattr(trainer.datamodule, "split_size", None)
        total = size("test") if size is not None else None  # from the manifests; None when unknown
        speed, eta = self.eval.rates(self.eval_samples, total)
        share = f", {100 * self.eval_samples / total:.0f}%" if total else ""
        log.info("eval batch %d (%d/%s samples%s) samples/s %s ETA %s",
                 done, self.eval_samples, total or "?", share, speed, eta)  # fmt: skip


def progress_callbacks(mode: str, every: int) -> tuple[bool, list[L.Callback]]:
    """(enable Lightning's progress bar, callbacks) for ``progress=<mode>``.

    ``auto`` shows the bar when stderr is a terminal and log lines otherwise; ``bar`` and ``log``
    force one; ``off`` shows neither.
    """
    if mode not in MODES:
        raise ValueError(f"progress={mode!r}: choose one of {MODES}")
    if mode == "auto":
        mode = "bar" if sys.stderr.isatty() else "log"
    if mode == "bar":
        return True, [TQDMProgressBar()]
    if mode == "log":
        return False, [ProgressLog(every)]
    return False, []
