"""What every training stage shares: freezing from the stage config, optimizer and schedule."""

from __future__ import annotations

import logging

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_scheduler
from transformers.modeling_layers import GradientCheckpointingLayer

from avglab.core.model import AvgCore
from avglab.core.transformers_names import is_checkpointing
from avglab.data.ranks import gather_objects
from avglab.stages import rng_state
from avglab.stages.sharding import apply_fsdp2, is_sharded

log = logging.getLogger(__name__)
RNG_KEY = "avglab_rng_states"  # checkpoint entry: every rank's random number generators
PARTS = ("vision", "projector", "newline", "llm", "router")
IMAGE_PARTS = ("vision", "projector", "newline", "router")  # parts a text-only sample never reaches
UPSTREAM = {"projector": ("vision",), "llm": ("vision", "projector", "newline")}  # parts feeding a part


def part_parameters(core: AvgCore, part: str) -> list[torch.nn.Parameter]:
    """Parameters of one named part of the core."""
    model = core.llava.model
    if part == "vision":
        unused = {id(p) for p in unused_vision_parameters(core)}
        return [p for p in model.vision_tower.parameters() if id(p) not in unused]
    if part == "projector":
        return list(model.multi_modal_projector.parameters())
    if part == "newline":
        return [model.image_newline]
    if part == "llm":
        return list(model.language_model.parameters()) + list(core.llava.lm_head.parameters())
    if part == "router":
        return list(core.selector.parameters()) if core.selector is not None else []
    raise ValueError(f"stage.train: unknown part {part!r}; choose from {list(PARTS)}")


def unused_vision_parameters(core: AvgCore) -> list[torch.nn.Parameter]:
    """Vision tower parameters the LLM never sees, which stay frozen in every stage.

    LLaVA-NeXT reads the hidden state of ``vision_feature_layer`` (-2): the layers after it,
    the post-layernorm and a pooling head get no gradient. Training them would leave DDP waiting
    for gradients that never come (``find_unused_parameters=false``) and waste optimizer state.
    """
    tower = core.llava.model.vision_tower
    layers = [m for m in tower.modules() if isinstance(m, GradientCheckpointingLayer)]
    feature = core.config.vision_feature_layer
    used = max(i % (len(layers) + 1) for i in ([feature] if isinstance(feature, int) else feature))
    unused = [p for layer in layers[used:] for p in layer.parameters()]
    unused += [p for name, p in tower.named_parameters() if name.startswith(("post_layernorm", "head"))]
    return unused


def no_decay_ids(module: torch.nn.Module) -> set[int]:
    """Ids of the parameters weight decay skips: biases and all parameters of norm layers.

    Norms are found by class name (LayerNorm, LlamaRMSNorm, MistralRMSNorm, ...), as in the
    Hugging Face Trainer, so any LLaVA-NeXT base is covered.
    """
    exempt = set()
    for sub in module.modules():
        norm = "norm" in type(sub).__name__.lower()
        for name, param in sub.named_parameters(recurse=False):
            if norm or name.endswith("bias"):
                exempt.add(id(param))
    return exempt


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
        self._rng_to_restore: dict | None = None  # a checkpoint's generators, set again when training starts

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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Stores every rank's random number generators (a collective on several ranks: all ranks save).

        Lightning keeps no generator state; a resumed run would otherwise draw other dropout masks and
        noise than the run it continues.
        """
        checkpoint[RNG_KEY] = gather_objects(rng_state.capture())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Keeps this rank's generators for ``on_train_start`` (setup could still draw from them)."""
        states = checkpoint.get(RNG_KEY) or []
        if len(states) == self.trainer.world_size:
            self._rng_to_restore = states[self.global_rank]
        elif states:
            log.warning(
                "the checkpoint holds random generator states of %d rank(s), this run has %d: not restored",
                len(states),
                self.trainer.world_size,
            )

    def on_train_start(self) -> None:
        if self._rng_to_restore is not None:
            rng_state.restore(self._rng_to_restore)
            self._rng_to_restore = None

    def on_train_epoch_start(self) -> None:
        # Frozen parts stay in eval mode so dropout never perturbs the feedback they give.
        for part in PARTS:
            if part in self.stage.train or part == "newline":
                continue
            for module in self.frozen_modules(part):
                module.eval()
            upstream_trains = set(UPSTREAM.get(part, ())) & set(self.stage.train)
            if upstream_trains and is_checkpointing(self.core.llava):
                # Gradients still flow through this frozen part (stage 1: LLM -> projector). HF only
                # recomputes layers in training mode, so its checkpointed layers (dropout-free in
                # LLaVA-NeXT's LLMs and CLIP) go back to train mode: model.gradient_checkpointing acts.
                for module in self.frozen_modules(part):
                    for layer in module.modules():
                        if isinstance(layer, GradientCheckpointingLayer):
                            layer.train()

    def frozen_modules(self, part: str) -> list[torch.nn.Module]:
        """Modules of a part (for switching frozen parts to eval mode)."""
        model = self.core.llava.model
        return {
            "vision": [model.vision_tower],
            "projector": [model.multi_modal_projector],
            "llm": [model.language_model, self.core.llava.lm_head],
            "router": [self.core.selector] if self.core.selector is not None else [],
        }[part]

    def configure_model(self) -> None:
        """Shards the core with FSDP2 under ``strategy=fsdp2``; other strategies wrap it themselves."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if isinstance(self.trainer.strategy, ModelParallelStrategy) and not is_sharded(self):
            apply_fsdp2(self, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        """AdamW with one lr per part, warmup then ``stage.schedule`` (cosine), stepped per batch.

        The vision encoder takes ``stage.lr_vision`` (paper: 2e-6 in stage 2, 2e-5 in stage 3),
        every other part ``stage.lr``; norms and biases get no weight decay unless
        ``stage.no_decay_norms_biases=false``. Steps count optimizer steps, so the schedule is
        the same for any accumulation (``stage.global_batch_size``).
        """
        groups = []
        exempt = no_decay_ids(self.core) if self.stage.get("no_decay_norms_biases", True) else set()
        for part in self.stage.train:
            params = [p for p in part_parameters(self.core, part) if p.requires_grad]
            lr = self.stage.lr_vision if part == "vision" and self.stage.lr_vision else self.stage.lr
            decay = [p for p in params if id(p) not in exempt]
            no_decay = [p for p in params if id(p) in exempt]
            groups += [
                {"params": decay, "lr": lr, "weight_decay": self.stage.weight_decay, "name": part},
                {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": f"{part}/no_decay"},
            ]
        optimizer = torch.optim.AdamW([g for g in groups + self.head_parameter_groups() if g["params"]])
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(
            self.stage.get("schedule", "cosine"),
            optimizer,
            num_warmup_steps=int(self.stage.warmup_ratio * total),
            num_training_steps=total,
        )
        schedule = {"scheduler": scheduler, "interval": "step", "name": "lr"}  # tags lr/<group name>
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def stage_heads(self) -> dict[str, torch.nn.Module]:
        """The stage's own heads in use, by name (not part of the core, so never in its output)."""
        return {}

    def head_parameter_groups(self) -> list[dict]:
        """One optimizer group per stage head: ``stage.lr``, no weight decay, on the stage's schedule."""
        return [
            {"params": list(head.parameters()), "lr": self.stage.lr, "weight_decay": 0.0, "name": name}
            for name, head in self.stage_heads().items()
        ]

    def heads_in_graph(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus an exact 0 over the stage heads' parameters (a step that did not use them, DDP)."""
        return loss + sum(p.sum() for head in self.stage_heads().values() for p in head.parameters()) * 0.0

    def batch_size(self, batch: dict) -> int:
        """Samples in a batch (for Lightning's logging)."""
        return len(batch["input_ids"])

    def keep_in_graph(self, loss: torch.Tensor, batch: dict, parts: tuple[str, ...] = ()) -> torch.Tensor:
        """``loss`` plus an exact 0 over the trained parameters this micro-batch may not reach.

        A micro-batch without any image (text-only records are part of the LLaVA mix) never runs
        the image path, and ``parts`` name others the caller knows went unused. Under DDP with
        ``find_unused_parameters=false`` a parameter without a gradient stalls the reducer; a
        returned None would skip the step on one rank only. The zero term gives each such parameter
        a zero gradient instead (the same loss value, accumulation unchanged). Sharded strategies
        hold only shards outside a unit's forward: they get the loss unchanged (and
        :meth:`check_lockstep` stops them before such a micro-batch).

        Args:
            loss: the step's scalar loss.
            batch: the micro-batch (``has_image`` (B,)).
            parts: parts to connect even when the batch has an image.
        """
        if not bool(batch["has_image"].any()):
            parts = (*parts, *IMAGE_PARTS)
        parts = tuple(p for p in dict.fromkeys(parts) if p in self.stage.train)
        if not parts or self.parameters_sharded():
            return loss
        params = [p for part in parts for p in part_parameters(self.core, part) if p.requires_grad]
        return loss + sum(p.sum() for p in params) * 0.0

    def parameters_sharded(self) -> bool:
        """Whether the trainer's strategy shards parameters (FSDP, FSDP2, DeepSpeed ZeRO-3)."""
        if self._trainer is None:
            return False
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy):
            return strategy.zero_stage_3
        return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))

    def check_lockstep(self, batch: dict) -> None:
        """Fails, naming the fix, on a micro-batch without images under a sharded strategy on 2+ ranks.

        Sharded units gather their parameters in collectives that every rank must enter in the
        same order; a rank whose micro-batch has no image skips the vision layers (and stage 4's
        LLM scoring), so the ranks' collectives no longer match (a size mismatch or a hang).

        Raises:
            RuntimeError: such a micro-batch under FSDP, FSDP2 or DeepSpeed ZeRO-3 on several ranks.
        """
        if "pixel_values" not in batch or bool(batch["has_image"].any()):
            return
        if self._trainer is None or self.trainer.world_size < 2 or not self.parameters_sharded():
            return
        raise RuntimeError(
            f"stage={self.stage.name}: a micro-batch of {len(batch['has_image'])} text-only samples on rank "
            f"{self.global_rank} under a sharded strategy would desynchronise the ranks (the vision layers "
            "do not run without an image); use strategy=ddp, a larger stage.batch_size, or data without "
            "text-only records"
        )

    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        self.check_lockstep(batch)

    def on_validation_batch_start(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_lockstep(batch)
