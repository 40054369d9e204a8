"""The global batch size, given once, turned into gradient accumulation for the world at hand.

``stage.global_batch_size`` (the paper: 256 in stage 1, 128 after) = micro batch per process
(``stage.batch_size`` or ``data.batch_size``) x data-parallel processes x accumulation steps, so
the same config trains on 1 CPU, 8 GPUs or 4 nodes with the same optimisation.
"""

from __future__ import annotations

import logging

import lightning as L
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def accumulation_steps(global_batch: int, micro_batch: int, data_parallel: int) -> int:
    """Micro batches each process accumulates per optimizer step.

    Raises:
        ValueError: the global batch is not a positive multiple of micro batch x processes.
    """
    per_pass = micro_batch * data_parallel
    if global_batch < 1 or micro_batch < 1 or global_batch % per_pass:
        raise ValueError(
            f"stage.global_batch_size={global_batch} must be a positive multiple of micro batch "
            f"(stage.batch_size or data.batch_size) {micro_batch} x {data_parallel} data-parallel "
            f"processes = {per_pass}; change one of them"
        )
    return global_batch // per_pass


def data_parallel_size(trainer: L.Trainer) -> int:
    """Processes that see different data: the world size over the tensor-parallel size."""
    tensor_parallel = getattr(trainer.strategy, "_tensor_parallel_size", 1)
    if tensor_parallel == "auto":  # ModelParallelStrategy's default: one node = one TP group
        tensor_parallel = trainer.num_devices
    return max(1, trainer.world_size // int(tensor_parallel))


def apply_global_batch(trainer: L.Trainer, cfg: DictConfig) -> int:
    """Sets ``trainer.accumulate_grad_batches`` from ``stage.global_batch_size`` (if given).

    Returns:
        The accumulation steps in effect.

    Raises:
        ValueError: both the global batch and ``trainer.accumulate_grad_batches`` are set.
    """
    global_batch = cfg.stage.get("global_batch_size")
    if global_batch is None:  # null: no accumulation (0 is refused by training.validation.check_stage)
        return trainer.accumulate_grad_batches
    if trainer.accumulate_grad_batches != 1:
        raise ValueError(
            "give stage.global_batch_size or trainer.accumulate_grad_batches, not both "
            f"({global_batch} and {trainer.accumulate_grad_batches})"
        )
    micro = cfg.stage.get("batch_size")
    micro = cfg.data.batch_size if micro is None else micro  # only null means "the data config's"
    world = data_parallel_size(trainer)
    steps = accumulation_steps(int(global_batch), int(micro), world)
    trainer.accumulate_grad_batches = steps
    log.info(
        "global batch %d = micro batch %d x %d processes x %d accumulation", global_batch, micro, world, steps
    )
    return steps
