"""Lightning strategies of the ``strategy/`` config group, built from plain config values.

``fsdp`` and ``deepspeed`` need a GPU; ``fsdp2`` (:class:`FSDP2Strategy`, a Lightning
``ModelParallelStrategy`` sharded by :mod:`avglab.stages.sharding` in ``configure_model``) and ``ddp``
also run as 2 CPU processes. The
unit that is sharded, wrapped and checkpointed is every transformer layer: transformers marks
each decoder layer (LLaMA, Mistral, Qwen2, ...) and each vision encoder layer (CLIP, SigLIP) as a
``GradientCheckpointingLayer``, so another LLaVA-NeXT base needs a config file, not code.
"""

from __future__ import annotations

import importlib.util

from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from avglab.stages.sharding import transformer_layers

SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


def fsdp(
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = True,
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
    limit_all_gathers: bool = True,
):
    """Lightning ``FSDPStrategy`` (GPU only) wrapping every transformer layer.

    Args:
        sharding_strategy: ``FULL_SHARD`` (ZeRO-3-like), ``SHARD_GRAD_OP`` (ZeRO-2-like),
            ``HYBRID_SHARD`` (shard within a node, replicate across nodes) or ``NO_SHARD``.
        activation_checkpointing: recompute each layer's activations in the backward pass.
        state_dict_type: ``sharded`` checkpoints (one file per rank, fast) or ``full``.
        cpu_offload: keep sharded parameters and gradients in CPU memory.
        limit_all_gathers: rate-limit prefetching to bound peak memory.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    layers = transformer_layers()
    return FSDPStrategy(
        auto_wrap_policy=layers,
        activation_checkpointing_policy=layers if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        limit_all_gathers=limit_all_gathers,
        use_orig_params=True,  # frozen and trained parameters share flat units; named param groups
    )


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` where ``data_parallel_size="auto"`` fills the world.

    Lightning reads "auto" as the number of nodes (one tensor-parallel group per node); avglab
    shards data-parallel only, so "auto" is every process over ``tensor_parallel_size``.
    """

    def setup_environment(self) -> None:
        """Resolves the data-parallel size, then sets up processes and the device mesh."""
        if self._data_parallel_size == "auto" and self._tensor_parallel_size != "auto":
            world = self.num_nodes * self.num_processes
            self._data_parallel_size = world // int(self._tensor_parallel_size)
        super().setup_environment()


def deepspeed(
    stage: int = 2,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    allgather_bucket_size: int = 200_000_000,
    reduce_bucket_size: int = 200_000_000,
):
    """Lightning ``DeepSpeedStrategy`` with ZeRO stage 2 or 3 (needs the deepspeed package and GPUs).

    Raises:
        ImportError: deepspeed is not installed.
        ValueError: a ZeRO stage other than 2 or 3.
    """
    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "strategy=deepspeed needs the deepspeed package on a CUDA machine: "
            "pip install 'avglab[deepspeed]' (or use strategy=fsdp / strategy=fsdp2)"
        )
    if stage not in (2, 3):
        raise ValueError(f"strategy.stage={stage}: ZeRO stage 2 or 3")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=offload_optimizer,
        offload_parameters=offload_parameters,
        allgather_bucket_size=allgather_bucket_size,
        reduce_bucket_size=reduce_bucket_size,
    )


def strategy_kind(strategy: DictConfig) -> str:
    """A short name of the configured strategy: auto, ddp, fsdp, fsdp2 or deepspeed."""
    target = str(strategy.get("_target_", ""))
    if not target:
        return str(strategy.get("name", "auto"))
    return {
        "lightning.pytorch.strategies.DDPStrategy": "ddp",
        "avglab.training.strategies.fsdp": "fsdp",
        "avglab.training.strategies.FSDP2Strategy": "fsdp2",
        "lightning.pytorch.strategies.ModelParallelStrategy": "fsdp2",
        "avglab.training.strategies.deepspeed": "deepspeed",
    }.get(target, target)


def check_strategy(cfg: DictConfig) -> None:
    """Fails early on a stage/strategy pair that cannot run, naming the fix.

    Evaluation generates with one model copy per process (batch size 1 for latency), so sharded
    strategies are for training stages only.
    """
    kind = strategy_kind(cfg.strategy)
    if cfg.stage.name == "eval" and kind in ("fsdp", "fsdp2", "deepspeed"):
        raise ValueError(f"stage=eval runs with strategy=auto or strategy=ddp, not strategy={kind}")
