"""Validation over a run: the history and best figures for ``metrics.json``, and ``stage.monitor``.

The tiny recipes train a fixed number of steps; a user's own set may need fewer or more. With
``stage.monitor=val/loss`` (off by default) Lightning's ``EarlyStopping`` stops when the metric has
not improved for ``stage.patience`` validations, its ``ModelCheckpoint`` keeps the best checkpoint
in ``checkpoints/best/``, and the stage output is that checkpoint's weights, not the last step's.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

log = logging.getLogger(__name__)
MODES = ("min", "max")


class ValidationHistory(L.Callback):
    """Every validation's ``val/*`` figures with the step they were taken at, and the best of them.

    Best = lowest (``mode=min``) or highest ``monitor``; each validation also logs one line (rank 0).

    Attributes:
        history: one ``{"step": s, "val/...": value, ...}`` per validation.
        best: the entry of ``history`` with the best ``monitor``, or None.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min") -> None:
        self.monitor, self.mode = monitor, mode
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Records this validation's figures; logs them beside the best so far."""
        if trainer.sanity_checking:
            return
        figures = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if not figures:
            return
        entry = {"step": trainer.global_step, **figures}
        self.history.append(entry)
        value = entry.get(self.monitor)
        if value is not None and not math.isnan(value) and (self.best is None or self.better(value)):
            self.best = entry
        if trainer.is_global_zero:
            best = self.best
            best = "" if best is None else f" (best {best[self.monitor]:.4f} at step {best['step']})"
            shown = value if value is not None else float("nan")
            log.info("validation at step %d: %s %.4f%s", trainer.global_step, self.monitor, shown, best)

    def better(self, value: float) -> bool:
        """Whether ``value`` beats the best so far."""
        best = self.best[self.monitor]
        return value < best if self.mode == "min" else value > best


def check_monitor(stage: DictConfig) -> None:
    """Fails on a ``stage.monitor`` setting that cannot work, naming the key."""
    if stage.get("monitor") is None:
        return
    if not str(stage.monitor).startswith("val/"):
        raise ValueError(f"stage.monitor={stage.monitor!r}: name a validation metric, e.g. val/loss")
    if stage.monitor_mode not in MODES:
        raise ValueError(f"stage.monitor_mode={stage.monitor_mode!r}: choose one of {MODES}")
    if stage.patience is not None and stage.patience < 1:
        raise ValueError(f"stage.patience={stage.patience}: must be >= 1, or null for no early stop")
    if stage.get("ema_decay") is not None:
        raise ValueError(
            "stage.monitor with stage.ema_decay: the best checkpoint holds the raw weights, not the average "
            "validation saw; set one of them to null"
        )


def monitor_callbacks(stage: DictConfig, run_dir: Path) -> list[L.Callback]:
    """The validation history, plus EarlyStopping and the best checkpoint when ``stage.monitor`` is set."""
    check_monitor(stage)
    monitor = stage.get("monitor")
    history = ValidationHistory(monitor or "val/loss", stage.get("monitor_mode") or "min")
    if monitor is None:
        return [history]
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints" / "best",
        filename="best-{step}",
        monitor=monitor,
        mode=stage.monitor_mode,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    callbacks = [history, best]
    if stage.patience is not None:
        callbacks.append(EarlyStopping(monitor=monitor, mode=stage.monitor_mode, patience=stage.patience))
    return callbacks


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The trainer's best-checkpoint callback (``stage.monitor``), or None."""
    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)


def load_best(trainer: L.Trainer, module: L.LightningModule) -> dict | None:
    """Puts the best checkpoint's weights into ``module``; returns what the stage output is, or None.

    Returns:
        ``{"path": ..., "step": ..., "monitor": ..., "score": ...}`` when ``stage.monitor`` kept a
        checkpoint, else None (the stage output is the last step's weights).
    """
    callback = best_checkpoint(trainer)
    if callback is None or not callback.best_model_path:
        return None
    saved = torch.load(callback.best_model_path, map_location="cpu", weights_only=True)
    module.load_state_dict(saved["state_dict"])
    log.info("stage output = the best checkpoint %s (%s %.4f)", callback.best_model_path, callback.monitor,
             float(callback.best_model_score))  # fmt: skip
    return {
        "path": str(callback.best_model_path),
        "step": int(saved["global_step"]),
        "monitor": callback.monitor,
        "score": float(callback.best_model_score),
    }
