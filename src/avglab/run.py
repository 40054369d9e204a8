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

from avglab.core.provenance import base_checkpoint, data_digest
from avglab.core.weights import full_core_state, load_core, load_router, save_core
from avglab.reduce.build import attach as attach_reduction
from avglab.stages.averaging import TrainableEMA
from avglab.stages.evaluate import EvalStage
from avglab.training.build import build_core, build_datamodule, saved_tokenizer
from avglab.training.checkpoints import check_explicit, newest_intact, use_atomic_saves
from avglab.training.eval_after import eval_after_config
from avglab.training.global_batch import apply_global_batch
from avglab.training.library_warnings import silence_library_warnings
from avglab.training.monitoring import ValidationHistory, load_best, monitor_callbacks
from avglab.training.progress import progress_callbacks
from avglab.training.strategies import check_strategy
from avglab.training.tensorboard_views import tensorboard_callbacks
from avglab.training.validation import check_stage

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
    """The checkpoint to resume from, checked intact before anything is built.

    ``ckpt_path=last`` takes the newest intact checkpoint of this stage in the workspace: the newest
    run's ``last.ckpt``, else its newest step checkpoint, else an older run's (each torn one passed over
    is logged with why). An explicit ``ckpt_path`` that is torn fails, naming the intact ones beside it.

    Raises:
        HandoffError: ``ckpt_path=last`` and no intact checkpoint of this stage.
        CheckpointError: an explicit ``ckpt_path`` that is missing or torn.
    """
    if cfg.ckpt_path != "last":
        return check_explicit(cfg.ckpt_path)
    runs = Path(cfg.workspace, "runs", cfg.stage.name)
    found, skipped = newest_intact(sorted(runs.glob("*/checkpoints"), reverse=True))  # run names sort by time
    for path, problem in skipped:
        log.warning("ckpt_path=last: skipped %s (%s)", path, problem)
    if found is None:
        torn = f"; every checkpoint found is torn: {[str(p) for p, _ in skipped]}" if skipped else ""
        raise HandoffError(f"ckpt_path=last: no intact checkpoint under {runs}/*/checkpoints{torn}")
    log.info("ckpt_path=last: resuming from %s", found)
    return str(found)


def fingerprint(cfg: DictConfig, init: Path | None) -> dict:
    """Config hash, init weights, base checkpoint, data digests and package versions of an output.

    ``base_checkpoint`` is the checkpoint whose LMM the run uses (``init`` minus router-only
    stages, with the SHA-256 of its weights) and ``data_digest`` hashes each split's shards (set
    by ``run`` once the shards exist): reports refuse to mix runs that differ in either.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    text = json.dumps(
        {k: v for k, v in resolved.items() if k not in ("run_dir", "workspace", "data")}, sort_keys=True
    )
    return {
        "config_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
        "init_from": str(init) if init else None,
        "base_checkpoint": base_checkpoint(init),
        "data_digest": None,  # set by run() once the data module knows the shards
        "model": cfg.model.name,
        "data": cfg.data.name,
        "data_config": data_settings(cfg.data),
        "versions": {p: version(p) for p in ("avglab", "torch", "transformers", "lightning", "webdataset")},
    }


def data_settings(data: DictConfig) -> dict:
    """What defines a data set's content: the generator's settings, or the converted shards' root and globs.

    ``data_digest`` hashes the shards themselves; this names them for people reading a report.
    """
    if data.get("synth") is not None:  # data=synth: the generator's seed and sizes decide the samples
        return OmegaConf.to_container(data.synth, resolve=True)
    return {key: data.get(key) for key in ("root", "train_shards", "val_shards", "test_shards")}


def publishes_stage_output(cfg: DictConfig) -> bool:
    """Whether this run becomes the workspace's ``<stage>`` output (the next stage's default start).

    ``publish_stage_output=null`` (the default) publishes a single run and not the jobs of a Hydra
    multirun: sweep members finish in any order, so the last one would win silently. ``true`` or
    ``false`` decides explicitly.
    """
    asked = cfg.get("publish_stage_output")
    if asked is not None:
        return bool(asked)
    return not is_multirun_job()


def is_multirun_job() -> bool:
    """True inside a job of ``python -m avglab -m ...`` (Hydra's multirun mode)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def stage_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Callbacks the stage config asks for (``run`` builds them first: a bad value fails before any model).

    Training stages: the EMA (``stage.ema_decay``), the validation history and ``stage.monitor``'s
    best checkpoint and early stop (``training.monitoring``).
    """
    if cfg.stage.name in ("eval", "bench"):
        return []
    ema = [TrainableEMA(cfg.stage.ema_decay)] if cfg.stage.get("ema_decay") is not None else []
    return ema + monitor_callbacks(cfg.stage, Path(cfg.run_dir))


def build_trainer(cfg: DictConfig, run_dir: Path, extra: list[L.Callback] | None = None) -> L.Trainer:
    """Lightning Trainer from the trainer/strategy/logger groups, checkpointing into the run dir.

    ``extra`` are the stage's callbacks when the caller built them already; None builds them here.
    """
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", save_last=True, every_n_train_steps=cfg.checkpoint_every
        ),
        LearningRateMonitor(logging_interval="step"),
        *(stage_callbacks(cfg) if extra is None else extra),
    ]
    bar, watchers = progress_callbacks(cfg.progress, cfg.progress_every)
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    trainer = instantiate(
        cfg.trainer,
        logger=instantiate(cfg.logger),
        callbacks=callbacks + watchers,
        strategy=strategy,
        enable_progress_bar=bar,
    )
    use_atomic_saves(trainer)  # a killed save never leaves a torn last.ckpt (training.checkpoints)
    if cfg.stage.name != "eval":
        apply_global_batch(trainer, cfg)  # stage.global_batch_size -> accumulation for this world size
    return trainer


def check_selector_loaded(cfg: DictConfig, core, init: Path | None, loaded) -> None:
    """Evaluation with a learned selector must find its trained weights.

    Otherwise evaluation would silently score a randomly initialised router (e.g. ``router.k``
    changed after stage 4, which changes the router's shapes).
    """
    learned = core.selector is not None and any(True for _ in core.selector.parameters())
    uses_it = cfg.stage.name in ("eval", "bench")  # training stages either train it or ignore it
    if cfg.stage.name == "bench" and cfg.stage.get("random_weights_ok", False):
        return  # a timing benchmark: a random router costs what a trained one costs
    found = isinstance(loaded, int) and loaded > 0 or isinstance(loaded, dict) and loaded.get("selector")
    if learned and uses_it and not found:
        raise ValueError(
            f"router={cfg.router.kind} has learned weights, but {init or 'the initial weights'} has none "
            f"that fit it (was stage 4 trained with the same router settings, e.g. router.k?). Train it with "
            f"`python -m avglab stage=rglf router=... ` using the same overrides, or pass "
            f"model.router_from=<folder>, or evaluate router=fixed/random/none."
        )


def load_weights(cfg: DictConfig, core, init: Path | None):
    """Stage handoff into ``core``: ``init`` (a stage output), then ``model.router_from`` if given.

    Returns:
        What was loaded (the loader's report), for ``check_selector_loaded``.
    """
    loaded = None
    if init is not None:
        loaded = load_core(core, init)
        log.info("initialised from %s (%s)", init, loaded)
    if cfg.model.get("router_from"):  # a trained router over fresh or checkpoint LLaVA weights
        loaded = load_router(core, cfg.model.router_from)
        log.info("router from %s (%d tensors)", cfg.model.router_from, loaded)
    return loaded


def run(cfg: DictConfig) -> dict:
    """Runs the configured stage and returns its metrics: bench, eval, or a training fit."""
    silence_library_warnings()
    L.seed_everything(cfg.seed, workers=True)
    check_strategy(cfg)
    check_stage(cfg)  # value ranges (lr, warmup, steps, batch sizes) before any folder or model
    extra_callbacks = stage_callbacks(cfg)  # built first: a bad value fails before any model
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    init = resolve_init(cfg)
    ckpt = resolve_ckpt(cfg) if cfg.ckpt_path else None
    tokenizer, image_processor, core = build_core(cfg, saved_tokenizer(cfg, init))
    attach_reduction(core, cfg.get("reduce"))  # reduce=none: None, every path as without it
    check_selector_loaded(cfg, core, init, load_weights(cfg, core, init))
    prints = fingerprint(cfg, init)
    if cfg.stage.name == "bench":  # timing only: no data module, no trainer
        from avglab.tools.bench.runner import run_bench

        return run_bench(cfg, core, tokenizer, image_processor, run_dir, prints)
    datamodule = build_datamodule(
        cfg, tokenizer, image_processor, cfg.stage.get("eval_batch_size"), cfg.stage.get("batch_size")
    )
    prints["data_digest"] = data_digest(datamodule.urls)  # the shards this run reads, by content
    views = tensorboard_callbacks(cfg, tokenizer, image_processor, init)  # HParams, Text, figures
    trainer = build_trainer(cfg, run_dir, extra_callbacks + views)
    if cfg.stage.name == "eval":
        return evaluate(cfg, core, tokenizer, trainer, datamodule, run_dir, prints)
    metrics = fit(cfg, core, trainer, datamodule, init, ckpt)
    state = full_core_state(core, trainer)  # a collective under sharded strategies: every rank gathers
    if trainer.is_global_zero:
        meta = {"stage": cfg.stage.name, "metrics": metrics, "fingerprint": prints}
        out = write_stage_output(cfg, core, tokenizer, state, run_dir, meta)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        if cfg.get("eval_after"):  # train and evaluate in one job (ablation/experiment configs)
            metrics["eval"] = run(eval_after_config(cfg, out))
    return metrics


def evaluate(cfg: DictConfig, core, tokenizer, trainer: L.Trainer, datamodule, run_dir: Path, prints: dict):
    """``stage=eval``: the test loop gathers every rank's samples; rank 0 writes ``metrics.json``.

    Its metrics carry the skipped samples and ``<unk>`` counts summed over ranks; every rank returns them.
    """
    module = EvalStage.from_config(core, tokenizer, cfg, run_dir, prints)
    trainer.test(module, datamodule=datamodule)
    return module.metrics


def fit(cfg: DictConfig, core, trainer: L.Trainer, datamodule, init: Path | None, ckpt: str | None) -> dict:
    """A training stage's fit; returns its final metrics, parameter counts, time and skipped samples."""
    module = get_class(cfg.stage.module)(core=core, stage=cfg.stage)
    if hasattr(module, "fit_datamodule"):  # e.g. stage=rglf_cached trains from a feedback cache
        datamodule = module.fit_datamodule(cfg, datamodule, init)
    if not datamodule.has_validation:  # validation off, rather than an empty loader Lightning warns about
        trainer.limit_val_batches = 0
    module.train()  # builders return eval-mode models; frozen parts go back to eval each epoch
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # never unpickle code
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}  # as of the last step:
    metrics["step"] = trainer.global_step
    history = next((c for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
    if history is not None and history.best is not None:
        metrics["best_val"] = history.best  # {"step": s, "val/...": ...} of the best validation
    best = load_best(trainer, module)  # stage.monitor: the stage output is the best checkpoint
    if best is not None:
        metrics["stage_output_from"] = best
    metrics.update(module.parameter_counts())
    metrics["fit_seconds"] = time.perf_counter() - start
    metrics["skipped_samples"] = dict(datamodule.skipped)
    metrics["unknown_tokens"] = dict(datamodule.unknown)  # words a tiny word-level tokenizer cannot represent
    return metrics


def write_stage_output(cfg: DictConfig, core, tokenizer, state: dict, run_dir: Path, meta: dict) -> Path:
    """Saves ``<run dir>/model`` (weights, tokenizer, resolved config); publishes it when this run should."""
    out = save_core(core, run_dir / "model", meta, state)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)  # what `python -m avglab.tools.export` rebuilds
    tokenizer.save_pretrained(str(out))  # a tiny model's word ids travel with its weights (saved_tokenizer)
    stage = cfg.stage.name
    if publishes_stage_output(cfg):  # the next stage's default start (stage.previous)
        target = pointer(cfg, stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"path": str(out.resolve()), "run_dir": str(run_dir.resolve())}))
        log.info("%s is now the workspace's %s output (%s)", out, stage, target)
    else:
        log.info(
            "%s is not the workspace's %s output (a multirun job or publish_stage_output=false); "
            "use it with init_from=%s",
            out,
            stage,
            out,
        )
    return out
