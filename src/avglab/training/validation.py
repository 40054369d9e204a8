"""Stage and batch settings checked once, before anything is built: a bad value names its key and range.

Without these checks a negative ``stage.lr`` trains by gradient ascent, ``stage.warmup_ratio=5`` or
``stage.max_steps=0`` publish an untrained output, and an explicit 0 batch size silently falls back to
another key (only null means "use the other key").
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig

from avglab.stages.pretrain import granularity_error

NOT_TRAINING = ("eval", "bench")  # stages that build no optimizer
# transformers.get_scheduler names that run with only warmup and total steps under a per-step Lightning
# scheduler (cosine_with_min_lr, warmup_stable_decay need extra arguments; reduce_lr_on_plateau and
# greedy need a monitored metric).
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)


class ConfigValueError(ValueError):
    """A config value outside its allowed range; the message names the key, the value and the range."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_number(key: str, value: Any, nullable: bool = False, why: str = "") -> None:
    """Refuses anything but a finite number > 0 (or None when ``nullable``).

    Raises:
        ConfigValueError: naming ``key``, the value and the allowed range.
    """
    if value is None and nullable:
        return
    if not _is_number(value) or value <= 0:
        allowed = "a number > 0" + (" or null" if nullable else "")
        raise ConfigValueError(f"{key}={value!r}: must be {allowed}{why}")


def number_in(key: str, value: Any, low: float, high: float, why: str = "") -> None:
    """Refuses anything but a finite number in ``[low, high]``.

    Raises:
        ConfigValueError: naming ``key``, the value and the range.
    """
    if not _is_number(value) or not low <= value <= high:
        raise ConfigValueError(f"{key}={value!r}: must be a number in [{low}, {high}]{why}")


def count(key: str, value: Any, minimum: int = 1, nullable: bool = False, why: str = "") -> None:
    """Refuses anything but an integer >= ``minimum`` (or None when ``nullable``).

    Raises:
        ConfigValueError: naming ``key``, the value and the range.
    """
    if value is None and nullable:
        return
    if not _is_int(value) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")
        raise ConfigValueError(f"{key}={value!r}: must be {allowed}{why}")


def check_batch_sizes(cfg: DictConfig) -> None:
    """Batch sizes are >= 1; the stage's own may be null (= the data config's), never 0.

    Raises:
        ConfigValueError: naming the key.
    """
    data, stage = cfg.get("data"), cfg.stage
    if data is not None:
        for key in ("batch_size", "eval_batch_size"):
            if key in data:
                count(f"data.{key}", data.get(key))
    fallback = " (null = the data config's batch size; 0 is not 'unset')"
    for key in ("batch_size", "eval_batch_size", "cache_batch_size"):
        if key in stage:
            count(f"stage.{key}", stage.get(key), nullable=True, why=fallback)
    if "global_batch_size" in stage:
        count(
            "stage.global_batch_size",
            stage.get("global_batch_size"),
            nullable=True,
            why=" (null = no accumulation)",
        )


def check_optimization(stage: DictConfig) -> None:
    """Learning rates, weight decay, warmup, schedule and steps of a training stage.

    Raises:
        ConfigValueError: naming the key and its range.
    """
    positive_number("stage.lr", stage.get("lr"), why=" (0 trains nothing, a negative lr ascends the loss)")
    positive_number(
        "stage.lr_vision",
        stage.get("lr_vision"),
        nullable=True,
        why=" (null = stage.lr for the vision encoder)",
    )
    number_in("stage.weight_decay", stage.get("weight_decay", 0.0), 0.0, math.inf)
    number_in(
        "stage.warmup_ratio",
        stage.get("warmup_ratio", 0.0),
        0.0,
        1.0,
        why=" (a share of the optimizer steps)",
    )
    schedule = stage.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ConfigValueError(f"stage.schedule={schedule!r}: choose one of {list(SCHEDULES)}")
    count("stage.max_steps", stage.get("max_steps"), why=" (optimizer steps a training stage runs)")
    count("stage.val_every", stage.get("val_every", 1), why=" (training steps between validations)")


def check_stage(cfg: DictConfig) -> None:
    """Every stage value with a range, checked before any model, data or run folder is made.

    Training stages check their optimizer settings and steps (``trainer.max_steps`` too, which
    follows ``stage.max_steps`` unless overridden); every stage checks its batch sizes, and the
    cached RGLF stage its sample counts.

    Raises:
        ConfigValueError: naming the key, the value and the allowed range.
    """
    stage = cfg.stage
    check_batch_sizes(cfg)
    if stage.name in NOT_TRAINING:
        if "max_new_tokens" in stage:
            count("stage.max_new_tokens", stage.get("max_new_tokens"))
        if "latency_samples" in stage:
            count("stage.latency_samples", stage.get("latency_samples"), minimum=0)
        return
    check_optimization(stage)
    if "granularity" in stage and "router" in cfg:
        wrong = granularity_error(stage.get("granularity"), list(cfg.router.granularities))
        if wrong:
            raise ConfigValueError(wrong)
    trainer = cfg.get("trainer")
    if trainer is not None and "max_steps" in trainer:
        count("trainer.max_steps", trainer.get("max_steps"), why=" (follows stage.max_steps)")
    if "cache_train_samples" in stage:
        count(
            "stage.cache_train_samples",
            stage.get("cache_train_samples"),
            why=" (samples the router trains on)",
        )
    if "cache_val_samples" in stage:
        count("stage.cache_val_samples", stage.get("cache_val_samples"), minimum=0, why=" (0: no validation)")
