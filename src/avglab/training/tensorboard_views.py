"""TensorBoard views of what the selector did: the result table, accuracy vs cost, routed sample grids.

``stage=eval``: the result table as the console prints it (Text tab, ``eval/result_table``), accuracy
against visual tokens and prefill FLOPs per selector (``eval/accuracy_vs_tokens``) and a grid of test
samples, a few per question type (``eval/sample_grid``). Stage 4 (a stage that trains only the router):
the same grid over fixed validation samples at every validation (``val/sample_grid``, by step).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from avglab.eval.summary import LATENCY_NOTE, TOKEN_NOTE, format_table
from avglab.eval.tensorboard_figures import (
    pick_per_type,
    sample_grid_figure,
    thumbnail,
    tokens_accuracy_figure,
)
from avglab.reduce.report import format_cost_table
from avglab.stages.evaluate import EvalStage, sample_of
from avglab.training.build import build_datamodule
from avglab.training.tensorboard_hparams import RunHParams, tensorboard_logger

log = logging.getLogger(__name__)
PER_TYPE = 3  # grid samples per question type
MAX_GRID_BATCHES = 8  # validation batches read at most to fill the stage-4 grid


def question_of(batch: dict, i: int, tokenizer) -> str:
    """Sample ``i``'s user instruction (its ``instruction_mask`` tokens), else its whole prompt."""
    mask = batch["instruction_mask"][i].bool()
    ids = batch["input_ids"][i][mask] if mask.any() else batch["prompt_input_ids"][i]
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip()


def view_of(batch: dict, i: int, tokenizer, mean, std) -> dict:
    """What a grid panel shows of sample ``i`` besides the answer: its image and question."""
    has_image = bool(batch["has_image"][i])
    return {
        "image": thumbnail(batch["pixel_values"][i], mean, std) if has_image else None,
        "question": question_of(batch, i, tokenizer),
    }


def result_markdown(results: dict[str, dict]) -> str:
    """The evaluation's result table as the console prints it, with the cost table when one was printed."""
    parts = [format_table(results)]
    if any(m.get("prefill_flops_relative") is not None for m in results.values()):
        parts += ["cost per mode (visual tokens per LLM layer; prefill FLOPs vs the finest level):"]
        parts += [format_cost_table(results)]
    parts += [f"tokens: {TOKEN_NOTE}", f"latency: {LATENCY_NOTE}"]
    return "\n\n".join(parts)


class EvalViews(L.Callback):
    """``stage=eval``: result table, accuracy-vs-cost figure and a test-sample grid (rank 0's samples).

    Args:
        tokenizer: decodes the questions.
        image_mean: per-channel mean of the image processor's normalisation.
        image_std: its per-channel standard deviation.
        per_type: grid samples per question type.
    """

    def __init__(self, tokenizer, image_mean, image_std, per_type: int = PER_TYPE):
        self.tokenizer, self.mean, self.std, self.per_type = tokenizer, image_mean, image_std, per_type
        self.counts: dict[str, int] = {}
        self.views: dict[str, dict] = {}  # sample id -> image and question

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        """Keeps the image and question of the batch's samples the grid still needs (rank 0)."""
        if not trainer.is_global_zero:
            return
        for i in pick_per_type(batch["question_type"], self.counts, self.per_type):
            self.views[batch["ids"][i]] = view_of(batch, i, self.tokenizer, self.mean, self.std)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Writes the table and figures once ``EvalStage`` has its results (after its epoch end)."""
        logger = tensorboard_logger(trainer)
        if logger is None or not isinstance(pl_module, EvalStage) or not pl_module.results:
            return
        writer, routed = logger.experiment, pl_module.selector_name
        writer.add_text("eval/result_table", result_markdown(pl_module.results), global_step=0)
        writer.add_figure("eval/accuracy_vs_tokens", tokens_accuracy_figure(pl_module.results, routed), 0)
        answered = {r["id"]: r for r in pl_module.records[routed]}  # rank 0's records, as the views
        samples = [{**answered[i], **view} for i, view in self.views.items() if i in answered]
        if samples:
            title = f"test samples: granularity chosen by {routed}, answer, right or wrong"
            writer.add_figure("eval/sample_grid", sample_grid_figure(samples, title), 0)
        writer.flush()


class ValidationGrid(L.Callback):
    """Stage 4: the routed answers of a few fixed validation samples per question type, every validation.

    The samples are read once from the validation shards by a data module of their own (stage 4 may
    train from a feedback cache, whose batches hold no images; its own counts stay untouched).

    Args:
        cfg: the run's config (data, router kind, ``stage.max_new_tokens`` if set).
        tokenizer: the run's tokenizer.
        image_processor: the run's image processor (its normalisation undoes into the thumbnails).
        per_type: grid samples per question type.
    """

    def __init__(self, cfg: DictConfig, tokenizer, image_processor, per_type: int = PER_TYPE):
        self.cfg, self.tokenizer, self.image_processor, self.per_type = (
            cfg,
            tokenizer,
            image_processor,
            per_type,
        )
        self.samples: list[tuple[dict, dict]] | None = None  # (batch of one, view)

    def read_samples(self) -> list[tuple[dict, dict]]:
        """Up to ``per_type`` validation samples of each question type, each as a batch of one."""
        data = build_datamodule(self.cfg, self.tokenizer, self.image_processor)
        loader = data.val_dataloader() if data.has_validation else []
        counts: dict[str, int] = {}
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        samples = []
        for index, batch in enumerate(loader):
            for i in pick_per_type(batch["question_type"], counts, self.per_type):
                samples.append((sample_of(batch, i), view_of(batch, i, self.tokenizer, mean, std)))
            if index + 1 >= MAX_GRID_BATCHES:
                break
        return samples

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Answers the grid samples with the router as it is now and logs the grid at this step."""
        logger = tensorboard_logger(trainer)
        sharded = getattr(pl_module, "parameters_sharded", lambda: False)()  # rank 0 alone cannot run it
        if logger is None or trainer.sanity_checking or sharded:
            return
        if self.samples is None:
            self.samples = self.read_samples()
        if not self.samples:
            return
        answerer = EvalStage(
            pl_module.core,
            self.tokenizer,
            Path(trainer.default_root_dir),
            selector_name=self.cfg.router.kind,
            compare_fixed=False,
            max_new_tokens=self.cfg.stage.get("max_new_tokens") or 8,
            latency_samples=0,
        )
        device = pl_module.device
        panels = []
        for batch, view in self.samples:
            moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            panels.append({**answerer.answer(moved, None)[0], **view})
        title = (
            f"validation samples at step {trainer.global_step}: routed granularity, answer, right or wrong"
        )
        logger.experiment.add_figure(
            "val/sample_grid", sample_grid_figure(panels, title), trainer.global_step
        )


def tensorboard_callbacks(
    cfg: DictConfig, tokenizer, image_processor, init: Path | None = None
) -> list[L.Callback]:
    """The run's TensorBoard views: HParams and config always, eval views or stage 4's validation grid.

    ``init`` is the stage output the run starts from (an evaluation's training knobs come from it).
    """
    callbacks: list[L.Callback] = [RunHParams(cfg, init)]
    if cfg.stage.name == "eval":
        mean, std = image_processor.image_mean, image_processor.image_std
        callbacks.append(EvalViews(tokenizer, mean, std))
    elif list(cfg.stage.get("train") or ()) == ["router"] and cfg.router.kind in ("avg", "image_only"):
        callbacks.append(ValidationGrid(cfg, tokenizer, image_processor))
    return callbacks
