"""One run = one stage: build the core, hand weights over from the previous stage, fit or evaluate."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from importlib.metadata import version
from pathlib import Path

import lightning as L
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from avglab.batching import apply_global_batch
from avglab.build import build_core, build_datamodule
from avglab.model.weights import full_core_state, load_core, load_router, save_core
from avglab.stages.evaluate import EvalStage
from avglab.strategies import check_strategy

log = logging.getLogger(__name__)


class HandoffError(FileNotFoundError):
    """A stage's input is missing; the message names the command that makes it."""


def pointer(cfg: DictConfig, stage: str) -> Path:
    """File recording where the latest finished run of ``stage`` in this workspace left its weights."""
    return Path(cfg.workspace) / "stages" / f"{stage}.json"


def resolve_init(cfg: DictConfig) -> Path | None:
    """Weights to start from: ``init_from`` if given, else the previous stage's latest output."""
    if cfg.init_from and cfg.ckpt_path:
        raise ValueError("init_from (weights only) and ckpt_path (resume a run) exclude each other; give one")
    if cfg.init_from:
        path = Path(cfg.init_from)
        if not (path / "core.safetensors").exists():
            raise HandoffError(f"init_from={path}: no core.safetensors there (give a stage output folder)")
        return path
    previous = cfg.stage.previous
    if not previous or cfg.ckpt_path:
        return None
    record = pointer(cfg, previous)
    if not record.exists():
        raise HandoffError(
            f"stage={cfg.stage.name} starts from stage {previous!r}, which has no output in workspace "
            f"{cfg.workspace}. Run `python -m avglab stage={previous}` first (or `make demo`), "
            "or pass init_from=<folder>."
        )
    return Path(json.loads(record.read_text())["path"])


def resolve_ckpt(cfg: DictConfig) -> str | None:
    """``ckpt_path=last`` means the newest last.ckpt of this stage in the workspace."""
    if cfg.ckpt_path != "last":
        return cfg.ckpt_path
    found = sorted(Path(cfg.workspace, "runs", cfg.stage.name).glob("*/checkpoints/last.ckpt"))
    if not found:
        raise HandoffError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {cfg.workspace}/runs/{cfg.stage.name}"
        )
    return str(found[-1])


def fingerprint(cfg: DictConfig, init: Path | None) -> dict:
    """Config hash, init weights and package versions recorded with every output."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    text = json.dumps(
        {k: v for k, v in resolved.items() if k not in ("run_dir", "workspace", "data")}, sort_keys=True
    )
    return {
        "config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "init_from": str(init) if init else None,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "data_config": OmegaConf.to_container(cfg.data.get("synth") or {}, resolve=True),
        "versions": {p: version(p) for p in ("avglab", "torch", "transformers", "lightning", "webdataset")},
    }


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """Lightning Trainer from the trainer/strategy/logger groups, checkpointing into the run dir."""
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every
        ),
        LearningRateMonitor(logging_interval="step"),
    ]
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    trainer = instantiate(cfg.trainer, logger=instantiate(cfg.logger), callbacks=callbacks, strategy=strategy)
    if cfg.stage.name != "eval":
        apply_global_batch(trainer, cfg)  # stage.global_batch_size -> accumulation for this world size
    return trainer


def run(cfg: DictConfig) -> dict:
    """Runs the configured stage and returns its metrics."""
    L.seed_everything(cfg.seed, workers=True)
    check_strategy(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init = resolve_init(cfg)
    ckpt = resolve_ckpt(cfg) if cfg.ckpt_path else None
    tokenizer, image_processor, core = build_core(cfg)
    if init is not None:
        loaded = load_core(core, init)
        log.info("initialised from %s (%s)", init, loaded)
    if cfg.model.get("router_from"):  # a trained router over fresh or checkpoint LLaVA weights
        loaded = load_router(core, cfg.model.router_from)
        log.info("router from %s (%d tensors)", cfg.model.router_from, loaded)
    prints = fingerprint(cfg, init)
    stage = cfg.stage
    datamodule = build_datamodule(
        cfg, tokenizer, image_processor, stage.get("eval_batch_size"), stage.get("batch_size")
    )
    trainer = build_trainer(cfg, run_dir)
    if stage.name == "eval":
        module = EvalStage(
            core,
            tokenizer,
            run_dir,
            selector_name=cfg.router.kind,
            compare_fixed=stage.compare_fixed,
            max_new_tokens=stage.max_new_tokens,
            fingerprint=prints,
        )
        trainer.test(module, datamodule=datamodule)
        return json.loads((run_dir / "metrics.json").read_text())
    module = get_class(stage.module)(core=core, stage=stage)
    module.train()  # builders return eval-mode models; frozen parts go back to eval each epoch
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # never unpickle code
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    metrics.update(module.parameter_counts())
    metrics["fit_seconds"] = time.perf_counter() - start
    metrics["skipped_samples"] = dict(datamodule.skipped)
    state = full_core_state(core, trainer)  # a collective under sharded strategies: every rank gathers
    if trainer.is_global_zero:
        meta = {"stage": stage.name, "metrics": metrics, "fingerprint": prints}
        out = save_core(core, run_dir / "model", meta, state)
        OmegaConf.save(cfg, out / "config.yaml", resolve=True)  # what `python -m avglab.export` rebuilds
        pointer(cfg, stage.name).parent.mkdir(parents=True, exist_ok=True)
        pointer(cfg, stage.name).write_text(
            json.dumps({"path": str(out.resolve()), "run_dir": str(run_dir.resolve())})
        )
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
