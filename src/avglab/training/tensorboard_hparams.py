"""What a run records for TensorBoard's HParams and Text tabs: its knobs with its final metrics, its config.

Every training and evaluation run writes one HParams session: the values of :data:`HPARAM_KEYS` (a
fixed list of config paths, so all members of a sweep share the same columns) and its final metrics
as ``hparams/<name>`` scalars. TensorBoard's HParams dashboard takes its columns from the first run's
experiment summary it finds, so every run declares the same metric list (:func:`metric_names`: the
training and the evaluation figures together, routing shares per granularity of ``router.granularities``);
a run fills in the ones it has and leaves the others blank. The knobs the job's command line set
(``router.k=8,16,32`` in a sweep) are marked as the ones that differ, so the dashboard shows them first.
The composed config goes to the Text tab.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from avglab.training.monitoring import ValidationHistory

log = logging.getLogger(__name__)

# The knobs that tell runs apart, by config path (documented in README's "What a run leaves").
HPARAM_KEYS = (
    "model.name",
    "data.name",
    "stage.name",
    "ablation",  # Hydra's choice of the ablation group (a Table 4 row), "none" outside one
    "router.kind",
    "router.k",
    "router.granularities",
    "router.granularity",
    "router.token_cost",
    "router.token_cost_scale",
    "stage.alpha",
    "stage.rank_weight",
    "stage.tie_eps",
    "stage.lr",
    "stage.lr_vision",
    "stage.max_steps",
    "stage.global_batch_size",
    "stage.ema_decay",
    "focus.kind",
    "focus.text.gamma",
    "focus.text.layer",
    "reduce.name",
    "seed",
)
# trainer.callback_metrics key -> HParams metric of a training run
FIT_METRICS = {
    "train/loss": "train_loss",
    "val/loss": "val_loss",
    "val/router_picks_best": "val_router_picks_best",
    "val/visual_tokens_routed_mean": "val_visual_tokens_routed_mean",
}
EVAL_METRICS = (
    "accuracy",
    "tokens_vs_full",
    "visual_tokens_mean",
    "latency_ms_total",
    "benchmark_score",
    "prefill_flops_relative",
)
PREFIX = "hparams/"
# a config group chosen on the command line -> the HParams key that names its choice
GROUP_KEYS = {
    "model": "model.name",
    "data": "data.name",
    "stage": "stage.name",
    "router": "router.kind",
    "focus": "focus.kind",
    "reduce": "reduce.name",
}


def hydra_choice(group: str) -> str | None:
    """Hydra's choice of a config group in this job (``ablation=full`` -> "full"), None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def command_line_keys() -> set[str]:
    """The :data:`HPARAM_KEYS` this Hydra job's command line set (``router.k=8``, ``router=fixed``, ...)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    keys = {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}
    return {GROUP_KEYS.get(key, key) for key in keys} & set(HPARAM_KEYS)


def hparam_value(value):
    """A config value as TensorBoard's HParams stores it: numbers, strings and bools; others as text."""
    if value is None:
        return "none"
    if isinstance(value, bool | int | float | str):
        return value
    return str(OmegaConf.to_container(value) if OmegaConf.is_config(value) else value)


def trained_by(init: Path | None) -> DictConfig | None:
    """The config of the stage that trained the weights in ``init`` (a stage output's ``config.yaml``)."""
    saved = Path(init) / "config.yaml" if init is not None else None
    return OmegaConf.load(saved) if saved is not None and saved.exists() else None


def hparams_of(cfg: DictConfig, init: Path | None = None) -> dict[str, object]:
    """The values of :data:`HPARAM_KEYS` in ``cfg`` (a path the config does not have: "none").

    An evaluation has no training knobs of its own: its ``stage.*`` values other than ``stage.name``
    are those of the stage that trained the weights it evaluates (``init``'s saved config), so the
    evaluations of an ``stage.alpha`` sweep differ in ``stage.alpha``.
    """
    source = trained_by(init) if cfg.stage.name == "eval" else None
    out = {}
    for key in HPARAM_KEYS:
        if key == "ablation":
            value = hydra_choice(key)
        elif source is not None and key.startswith("stage.") and key != "stage.name":
            value = OmegaConf.select(source, key, default=None)
        else:
            value = OmegaConf.select(cfg, key, default=None)
        out[key] = hparam_value(value)
    return out


def metric_names(cfg: DictConfig) -> list[str]:
    """Every run's HParams metric list: evaluation figures, training figures, a share per granularity.

    The dashboard shows the first five by default: accuracy, tokens vs full, visual tokens, latency
    (an evaluation's), then the training loss.
    """
    shares = [f"share_{g}" for g in OmegaConf.select(cfg, "router.granularities", default=None) or ()]
    names = (*EVAL_METRICS[:4], "train_loss", "val_loss", "best_val_loss", *EVAL_METRICS[4:], *shares)
    rest = [name for name in FIT_METRICS.values() if name not in names]
    return [PREFIX + name for name in (*names, *rest)]


def fit_metrics(trainer: L.Trainer) -> dict[str, float]:
    """A training run's final figures (the last step's, and the best validation loss when tracked)."""
    got = trainer.callback_metrics
    out = {PREFIX + name: float(got[key]) for key, name in FIT_METRICS.items() if key in got}
    best = next((c.best for c in trainer.callbacks if isinstance(c, ValidationHistory)), None)
    if best and best.get("val/loss") is not None:
        out[PREFIX + "best_val_loss"] = float(best["val/loss"])
    return out


def eval_metrics(metrics: dict) -> dict[str, float]:
    """An evaluation's final figures from its ``metrics.json`` content (the configured selector's)."""
    out = {
        "accuracy": metrics["accuracy"],
        "benchmark_score": metrics["benchmark"]["score"],
        "visual_tokens_mean": metrics["visual_tokens_mean"],
        "tokens_vs_full": 1.0 - metrics["token_reduction"],
        "prefill_flops_relative": metrics.get("prefill_flops_relative"),
        "latency_ms_total": metrics["latency_ms"].get("total"),
    }
    histogram = metrics["granularity_histogram"]
    routed = sum(histogram.values())
    if routed:  # a selector that chooses no level (FocusLLaVA's samplers) has no shares
        out.update({f"share_{g}": n / routed for g, n in histogram.items()})
    return {PREFIX + k: float(v) for k, v in out.items() if v is not None}


def config_markdown(cfg: DictConfig) -> str:
    """The composed config as a Markdown code block (resolved where it can be)."""
    try:
        text = OmegaConf.to_yaml(cfg, resolve=True)
    except Exception as error:  # e.g. a ${hydra:...} key outside a Hydra job: show it unresolved
        log.debug("config shown unresolved: %s", error)
        text = OmegaConf.to_yaml(cfg)
    return f"```yaml\n{text}```"


def tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger on rank 0, else None (other loggers and ranks write nothing)."""
    logger = trainer.logger
    return logger if trainer.is_global_zero and isinstance(logger, TensorBoardLogger) else None


def mark_swept(experiment, keys: set[str]) -> None:
    """Marks ``keys`` as the hparams that differ between runs in an experiment summary (in place).

    The dashboard lists those columns first and shows the first five by default; a run cannot see
    its sweep's other members, so the knobs its command line set stand for the swept ones.
    """
    from tensorboard.plugins.hparams import plugin_data_pb2

    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    for info in data.experiment.hparam_infos:
        info.differs = info.name in keys
    value.metadata.plugin_data.content = data.SerializeToString()


def write_hparams(
    logger: TensorBoardLogger, params: dict, names: list[str], values: dict, step: int, swept: set[str]
) -> None:
    """One HParams session: the experiment's columns (all of ``names``), this run's values and metrics.

    torch's ``hparams`` summaries are written into the run's own event file (``SummaryWriter.add_hparams``
    would open a sub-run); the metrics are plain scalars the dashboard reads by tag. ``swept``: the
    keys shown first (:func:`mark_swept`).
    """
    from torch.utils.tensorboard.summary import hparams

    exp, start, end = hparams(params, dict.fromkeys(names, 0.0))  # metric values come from the scalars
    mark_swept(exp, swept)
    writer = logger.experiment._get_file_writer()  # as Lightning's own log_hyperparams does
    for summary in (exp, start, end):
        writer.add_summary(summary, step)
    logger.log_metrics(values, step)
    logger.experiment.flush()


class RunHParams(L.Callback):
    """Writes the config (Text tab) when a fit or test starts and the HParams session when it ends.

    Args:
        cfg: the run's composed config.
        init: the stage output the run starts from (an evaluation's training knobs come from it).
    """

    def __init__(self, cfg: DictConfig, init: Path | None = None):
        self.params = hparams_of(cfg, init)
        self.swept = command_line_keys()
        self.names = metric_names(cfg)
        self.config_text = config_markdown(cfg)

    def _config(self, trainer: L.Trainer) -> None:
        logger = tensorboard_logger(trainer)
        if logger is not None:
            logger.experiment.add_text("config", self.config_text, global_step=0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The config, before the first step (a run that fails still shows what it ran)."""
        self._config(trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The config, before the first test batch."""
        self._config(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The HParams session with the last step's figures, at the last step."""
        logger = tensorboard_logger(trainer)
        if logger is not None:
            write_hparams(
                logger, self.params, self.names, fit_metrics(trainer), trainer.global_step, self.swept
            )

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The HParams session with the configured selector's figures (``EvalStage.metrics``)."""
        logger = tensorboard_logger(trainer)
        metrics = getattr(pl_module, "metrics", None)
        if logger is not None and metrics:
            write_hparams(logger, self.params, self.names, eval_metrics(metrics), 0, self.swept)
