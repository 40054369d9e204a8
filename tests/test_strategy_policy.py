"""Strategy, launcher and trainer configs; the per-stage training policy; memory figures (all in-process)."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from stage_config import compose_run

from avglab.core.builders import tiny_llava
from avglab.stages.sharding import transformer_layers
from avglab.tools.memory_estimate import LayerCost, activation_gb, parameter_counts
from avglab.training.build import build_core
from avglab.training.global_batch import accumulation_steps, apply_global_batch
from avglab.training.strategies import FSDP2Strategy, check_strategy

SMALL = ["data.synth.n_train=8", "data.synth.n_val=4", "data.synth.n_test=2", "router.k=4"]


def make_cfg(tmp_path: Path, *overrides: str, hydra: bool = False):
    return compose_run(tmp_path, f"{tmp_path}/run", *SMALL, *overrides, hydra=hydra)


# ----------------------------------------------------------------- strategies and launchers
def test_ddp_and_fsdp2_configs_build_lightning_strategies(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

    assert isinstance(instantiate(make_cfg(tmp_path, "strategy=ddp").strategy), DDPStrategy)
    fsdp2 = instantiate(make_cfg(tmp_path, "strategy=fsdp2").strategy)
    assert isinstance(fsdp2, FSDP2Strategy) and isinstance(fsdp2, ModelParallelStrategy)
    assert fsdp2._tensor_parallel_size == 1 and fsdp2._save_distributed_checkpoint


def test_fsdp_wraps_and_checkpoints_every_transformer_layer_and_is_gpu_only(tmp_path):
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = instantiate(make_cfg(tmp_path, "strategy=fsdp").strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["use_orig_params"] and strategy._state_dict_type == "sharded"
    layers = {
        type(m).__name__ for m in tiny_llava(60, 5).modules() if isinstance(m, tuple(transformer_layers()))
    }
    assert layers == {"LlamaDecoderLayer", "CLIPEncoderLayer"}  # decoder and vision encoder layers
    with pytest.raises(Exception, match="GPU"):
        L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_builds_zero_stages(tmp_path, stage):
    strategy = instantiate(make_cfg(tmp_path, "strategy=deepspeed", f"strategy.stage={stage}").strategy)
    assert strategy.config["zero_optimization"]["stage"] == stage


def test_deepspeed_missing_says_how_to_install(monkeypatch):
    from avglab.training import strategies

    monkeypatch.setattr(strategies.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install 'avglab\\[deepspeed\\]'"):
        strategies.deepspeed()


@pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install 'avglab[cluster]')",
)
def test_slurm_launcher_config_composes_for_the_cluster(tmp_path):
    cfg = make_cfg(tmp_path, "hydra/launcher=slurm", "trainer=gpu", "trainer.num_nodes=2", hydra=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"


def test_evaluation_refuses_sharded_strategies(tmp_path):
    with pytest.raises(ValueError, match="stage=eval runs with strategy=auto or strategy=ddp"):
        check_strategy(make_cfg(tmp_path, "stage=eval", "strategy=fsdp2"))


# ----------------------------------------------------------------- global batch
def test_global_batch_becomes_accumulation_for_the_world_size(tmp_path):
    assert accumulation_steps(128, 4, 8) == 4 and accumulation_steps(256, 16, 16) == 1
    with pytest.raises(ValueError, match="stage.global_batch_size=100"):
        accumulation_steps(100, 4, 8)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    cfg = make_cfg(tmp_path, "stage=instruct", "++stage.global_batch_size=16", "stage.batch_size=4")
    assert apply_global_batch(trainer, cfg) == 4 and trainer.accumulate_grad_batches == 4
    both = make_cfg(
        tmp_path, "stage=instruct", "++stage.global_batch_size=16", "trainer.accumulate_grad_batches=2"
    )
    with pytest.raises(ValueError, match="not both"):
        apply_global_batch(L.Trainer(accelerator="cpu", accumulate_grad_batches=2, logger=False), both)


# ----------------------------------------------------------------- optimizer policy
def stage_module(tmp_path, stage, *overrides):
    cfg = make_cfg(tmp_path, f"stage={stage}", *overrides)
    L.seed_everything(0, verbose=False)
    tokenizer, image_processor, core = build_core(cfg)
    module = get_class(cfg.stage.module)(core=core, stage=cfg.stage)
    module.data = (cfg, tokenizer, image_processor)  # for make_batch
    return module, cfg


def optimizer_of(module):
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)  # all configure_optimizers reads
    try:
        return module.configure_optimizers()["optimizer"]
    finally:
        module._trainer = None


def test_param_groups_follow_the_paper_per_stage(tmp_path):
    module, _ = stage_module(
        tmp_path, "multigran", "stage.lr=1e-5", "stage.lr_vision=2e-5", "stage.weight_decay=0.1"
    )
    optimizer = optimizer_of(module)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    names = dict(module.core.named_parameters())
    tower = module.core.llava.model.vision_tower
    assert all(lr_of[id(p)] == 2e-5 for p in tower.parameters() if id(p) in lr_of)  # vision: its own lr
    assert lr_of[id(module.core.llava.lm_head.weight)] == 1e-5
    for name, p in names.items():
        if id(p) not in decay_of:
            continue
        no_decay = name.endswith("bias") or "norm" in name or "layrnorm" in name
        assert decay_of[id(p)] == (0.0 if no_decay else 0.1), name
    # the vision layers after vision_feature_layer=-2 feed nothing: never trained
    assert not any(p.requires_grad for p in tower.post_layernorm.parameters())
    assert not any(id(p) in lr_of for p in tower.encoder.layers[-1].parameters())
    rglf, _ = stage_module(tmp_path, "rglf")
    params = [p for g in optimizer_of(rglf).param_groups for p in g["params"]]
    assert {id(p) for p in params} == {id(p) for p in rglf.core.selector.parameters()}


def test_untrained_vision_parameters_are_exactly_those_without_gradient(tmp_path):
    from avglab.stages.base import unused_vision_parameters

    module, _ = stage_module(tmp_path, "instruct")
    core = module.core
    for p in core.parameters():
        p.requires_grad_(True)
    batch = make_batch(module)
    module.training_step(batch, 0).backward()
    no_grad = {id(p) for p in core.llava.model.vision_tower.parameters() if p.grad is None}
    assert no_grad == {id(p) for p in unused_vision_parameters(core)} and no_grad


def make_batch(module, size=1):
    from avglab.training.build import build_datamodule

    data = build_datamodule(*module.data, eval_batch_size=size)
    data.rank, data.world_size = 0, 1
    return next(iter(data.val_dataloader()))


# ----------------------------------------------------------------- switches
def test_gradient_checkpointing_and_attention_switches_keep_the_numbers(tmp_path):
    from avglab.tools.memory_estimate import saved_bytes

    results = {}
    for name, overrides in {
        "plain": [],
        "checkpointing": ["model.gradient_checkpointing=true"],
        "eager": ["model.attn_implementation=eager"],
    }.items():
        module, _ = stage_module(tmp_path, "instruct", *overrides)
        module.train()
        batch = make_batch(module)
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        box = {}
        step = lambda m=module, b=box, x=batch: b.setdefault("loss", m.training_step(x, 0))  # noqa: E731
        saved = saved_bytes(step, params)
        box["loss"].backward()
        grad = module.core.llava.lm_head.weight.grad.clone()
        results[name] = (box["loss"].detach(), grad, saved)
    plain = results["plain"]
    for name in ("checkpointing", "eager"):
        torch.testing.assert_close(results[name][0], plain[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[name][1], plain[1], rtol=1e-4, atol=1e-6)
    assert results["checkpointing"][2] < plain[2]  # fewer activations kept for backward


def test_stage_one_recomputes_the_frozen_llm_under_checkpointing(tmp_path):
    module, _ = stage_module(
        tmp_path, "pretrain", "stage.train=[projector]", "model.gradient_checkpointing=true"
    )
    module.train()
    module.on_train_epoch_start()
    llm = module.core.llava.model.language_model
    assert not llm.training and all(layer.training for layer in llm.layers)  # frozen, yet recomputed
    assert not module.core.llava.model.vision_tower.training


# ----------------------------------------------------------------- memory
def test_stage3_runs_vision_once_and_one_batched_llm_pass(tmp_path):
    from avglab.tools.memory import measure_stage

    stage3 = measure_stage("multigran", tmp_path, batch=2, steps=1)
    stage2 = measure_stage("instruct", tmp_path, batch=2, steps=1)
    assert (stage3["vision_passes"], stage3["llm_passes"]) == (1, 1)
    assert 2 <= stage3["llm_rows"] < 10  # 2 samples x 5 levels packed into shared rows
    assert stage2["activations_mb"] < stage3["activations_mb"] < 5 * stage2["activations_mb"]
    assert stage3["adamw_mb"] == pytest.approx(2 * stage3["trainable_mb"], rel=0.01)


def test_7b_parameter_counts_and_stage3_token_budget():
    counts = parameter_counts(router_ffn=4096)
    assert counts["llm"] == 6_738_939_904  # Vicuna-7B with LLaVA-NeXT's 32064-token vocabulary
    assert counts["projector"] == 1024 * 4096 + 4096 + 4096 * 4096 + 4096
    share = counts["router"] / sum(counts.values())
    assert 0.015 < share < 0.018  # the paper's ~1.66% with a feed-forward of the hidden size
    costs = {k: LayerCost(1.0, 0.0) for k in ("llm_trained", "llm_frozen", "vision_trained", "router")}
    stage3 = activation_gb("multigran", costs, text_tokens=100, checkpointing=False)
    # packed rows as long as the finest: [3028], [1588, 844, 484], [292]
    assert stage3["llm_tokens_padded"] == 3 * (2928 + 100)
    assert stage3["llm_tokens_unpadded"] == 2928 + 1488 + 744 + 384 + 192 + 5 * 100
    assert OmegaConf.create({"ok": True}).ok
