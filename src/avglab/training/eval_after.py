"""Train-then-evaluate in one job: the evaluation config that follows a training stage.

A config with an ``eval_after`` node (the eval stage's settings, composed by the ablation and
experiment configs as ``- /stage@eval_after: eval``) makes ``run`` evaluate a training stage's
output right after the fit, in the same process and Hydra job: a multirun member then leaves both
the stage's ``metrics.json`` and, in ``<run dir>/eval/``, the eval stage's ``metrics.json``,
``predictions.jsonl`` and TensorBoard events. The stages stay separate LightningModules: this is
just ``python -m avglab stage=eval init_from=<run dir>/model`` with the same model, router and
data settings.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

EVAL_SUBDIR = "eval"


def eval_after_config(cfg: DictConfig, model_dir: Path) -> DictConfig:
    """The config of the evaluation that follows a fit.

    Args:
        cfg: the training run's config (with ``eval_after``).
        model_dir: the stage output the fit just wrote (``<run dir>/model``).

    Returns:
        A copy of ``cfg`` with ``stage = eval_after``, ``init_from = model_dir``, no resume, and
        ``run_dir = <run dir>/eval`` (so the two metrics.json files never overwrite each other).
    """
    node = cfg.get("eval_after")
    if node is None:
        raise ValueError("eval_after is not set: nothing to evaluate after the fit")
    if node.get("name") != "eval":
        raise ValueError(
            f"eval_after must hold the eval stage's settings (name: eval), got name={node.get('name')}"
        )
    resolved = OmegaConf.to_container(cfg, resolve=False)
    out = OmegaConf.create(resolved)
    OmegaConf.set_struct(out, False)
    out.stage = OmegaConf.to_container(node, resolve=False)
    out.init_from = str(model_dir)
    out.ckpt_path = None
    out.run_dir = str(Path(cfg.run_dir) / EVAL_SUBDIR)
    del out["eval_after"]
    OmegaConf.set_struct(out, True)
    return out
