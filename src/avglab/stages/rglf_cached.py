"""Stage 4 from a feedback cache: RGLF (Eqs. 4-9) on cached frozen-LMM scores and router inputs.

Same loss, logging and outputs as ``stage=rglf``; the difference is where a batch comes from. The
first run with a given (LMM weights, data, granularities, ...) computes the cache once
(:mod:`avglab.feedback_cache`); every later run, e.g. each member of a ``router.k`` or
``stage.alpha`` sweep, trains the router only: no vision tower, no LLM, no image decoding.
The cache holds the first ``stage.cache_train_samples`` training samples in shard order (and
``stage.cache_val_samples`` validation samples), reshuffled every epoch with ``seed``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from avglab.feedback_cache import FeedbackCache, cache_spec, compute_cache, load_or_build, skipped_counts
from avglab.model.core import AvgCore
from avglab.model.router import RouterInput
from avglab.stages.rglf import RglfStage

log = logging.getLogger(__name__)


class FeedbackCacheDataModule(L.LightningDataModule):
    """Train/val loaders over cached samples.

    Args:
        train: the cached training samples.
        val: cached validation samples, or None (validation off).
        batch_size: samples per batch.
        seed: shuffling seed of the training order (a new order every epoch).
        skipped: skip reasons met while the cache was built (reported as the run's skips).
    """

    def __init__(
        self, train: FeedbackCache, val: FeedbackCache | None, batch_size: int, seed: int, skipped=None
    ):
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.skipped = skipped if skipped is not None else {}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            self.train, self.batch_size, shuffle=True, generator=generator, collate_fn=FeedbackCache.collate
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if self.val is None:
            return []
        return torch.utils.data.DataLoader(self.val, self.batch_size, collate_fn=FeedbackCache.collate)


class CachedRglfStage(RglfStage):
    """RGLF on a feedback cache (router only, like stage 4).

    Args:
        core: the shared core with a trainable router.
        stage: ``stage=rglf_cached``: the rglf settings plus ``cache_train_samples``,
            ``cache_val_samples``, ``cache_batch_size`` (frozen-LMM scoring batch) and
            ``cache_dir`` (null: ``<workspace>/cache/feedback``).
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        super().__init__(core, stage)
        if stage.cache_train_samples < 1:
            raise ValueError(f"stage.cache_train_samples={stage.cache_train_samples}: must be >= 1")
        if stage.cache_val_samples < 0:
            raise ValueError(f"stage.cache_val_samples={stage.cache_val_samples}: must be >= 0")
        self.cache_stats: dict[str, float] = {}

    def fit_datamodule(self, cfg: DictConfig, datamodule, init: Path | None) -> FeedbackCacheDataModule:
        """Loads (or first builds) the caches of the train and val splits; called by ``run``.

        Args:
            cfg: the run config (``seed``, ``workspace``, ``trainer.devices``).
            datamodule: the run's shard datamodule (shards, tokenizer, processor).
            init: the stage output the core was loaded from (for the log only; the key hashes
                the loaded weights themselves).
        """
        if int(cfg.trainer.devices) * int(cfg.trainer.num_nodes) != 1:
            raise ValueError(
                "stage=rglf_cached trains on one process (trainer.devices=1, trainer.num_nodes=1); "
                "use stage=rglf on several devices"
            )
        root = Path(self.stage.cache_dir or Path(cfg.workspace) / "cache" / "feedback")
        batch = self.stage.cache_batch_size or datamodule.batch_size
        caches = {}
        for split, samples in (
            ("train", self.stage.cache_train_samples),
            ("val", self.stage.cache_val_samples),
        ):
            if not samples or (split == "val" and not datamodule.urls.get("val")):
                caches[split] = None
                continue
            spec = cache_spec(self.core, datamodule, split, samples)
            cache, built = load_or_build(
                root, spec, lambda split=split, samples=samples: self.build(datamodule, split, samples, batch)
            )
            caches[split] = cache
            self.cache_stats[f"feedback_cache/{split}_built"] = float(built)
            self.cache_stats[f"feedback_cache/{split}_build_seconds"] = float(
                cache.meta.get("build_seconds", 0.0) if built else 0.0
            )
            log.info("%s feedback cache for %s (%s)", "built" if built else "reused", split, init)
        train = caches["train"]
        return FeedbackCacheDataModule(
            train,
            caches["val"],
            self.stage.batch_size or datamodule.batch_size,
            cfg.seed,
            skipped_counts(train.meta),
        )

    def build(self, datamodule, split: str, samples: int, batch_size: int) -> tuple[dict, dict]:
        """Scores the first ``samples`` samples of ``split`` in shard order with the frozen core."""
        from avglab.data.datamodule import ShardDataModule

        p = datamodule.processor
        reader = ShardDataModule(
            urls={"test": datamodule.urls[split]},  # the test loader reads shards in order, unshuffled
            tokenizer=p.tokenizer,
            image_processor=p.image_processor,
            template=p.template,
            batch_size=batch_size,
            eval_batch_size=batch_size,
            num_workers=datamodule.num_workers,
            seed=datamodule.seed,
            max_length=p.max_length,
            max_skip_fraction=datamodule.budget.max_fraction,
            shard_sizes=datamodule.shard_sizes,
            rank=0,
            world_size=1,
        )
        tensors, facts = compute_cache(self.core, iter(reader.test_dataloader()), samples)
        facts["skipped"] = dict(reader.skipped)
        return tensors, facts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == 0 and batch_idx == 0:  # into the run's metrics.json (cost accounting)
            for name, value in self.cache_stats.items():
                self.log(name, value, batch_size=len(batch["feedback"]))
        return super().training_step(batch, batch_idx)

    def routed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits from cached inputs; cached feedback after ``stage.token_cost``."""
        owner = batch["tile_owner"].to(self.device)
        encoded = self.core.pyramid(batch["tiles"].to(self.device), owner, batch["has_image"])
        inputs = RouterInput(
            encoded.levels, owner, batch["instruction"], batch["instruction_mask"], len(batch["feedback"])
        )
        logits = self.core.selector(inputs)
        tokens = batch["tokens"].to(self.device)
        return logits, self.priced(batch["feedback"], tokens), tokens
