"""FSDP2 (``fully_shard``) for a stage module under Lightning's ``ModelParallelStrategy``.

Every transformer layer (LLM decoder, vision encoder) becomes its own FSDP unit, gathered just
before it runs and freed after. Everything else (embeddings, LM head, projector, image newline,
router) forms the root unit. The core is driven through several methods besides ``forward``
(``encode``, ``all_levels``, ``router_input``, a bare ``image_newline`` parameter), so the root
is the LightningModule itself with ``training_step``/``validation_step`` registered as forward
methods: its parameters are gathered once per step, whatever core methods the stage calls.
"""

from __future__ import annotations

import lightning as L
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

STEP_METHODS = ("training_step", "validation_step")


def transformer_layers() -> set[type]:
    """Module types FSDP wraps and checkpoints: the LLM decoder and vision encoder layers."""
    return {GradientCheckpointingLayer}


def layer_units(module: nn.Module) -> list[nn.Module]:
    """The modules that become their own FSDP unit, innermost first."""
    kinds = tuple(transformer_layers())
    return [m for m in module.modules() if isinstance(m, kinds)]


def apply_fsdp2(module: L.LightningModule, mesh) -> int:
    """Shards ``module`` in place over the data-parallel ``mesh``; returns the number of units.

    Call it from ``configure_model`` before the optimizer exists: sharding replaces parameters
    by DTensor parameters (``requires_grad`` is kept, so the stage's freezing survives).
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = layer_units(module)
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in STEP_METHODS:
        register_fsdp_forward_method(module, name)
    return len(units) + 1


def is_sharded(module: nn.Module) -> bool:
    """True once :func:`apply_fsdp2` ran on ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
