"""Stage 4 from a feedback cache: RGLF (Eqs. 4-9) on cached frozen-LMM scores and router inputs.

Same loss, logging and outputs as ``stage=rglf``; the difference is where a batch comes from. The
first run with a given (LMM weights, data, granularities, ...) computes the cache once
(:mod:`avglab.avg.feedback_cache`); every later run, e.g. each member of a ``router.k`` or
``stage.alpha`` sweep, trains the router only: no vision tower, no LLM, no image decoding.
The cache holds the first ``stage.cache_train_samples`` training samples in shard order (and
``stage.cache_val_samples`` validation samples), reshuffled every epoch with ``seed``. A request
beyond the sample count of the shards' manifests fails before anything is scored.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from avglab.avg.feedback_cache import (
    FeedbackCache,
    cache_spec,
    compute_cache,
    skipped_counts,
    unknown_counts,
)
from avglab.avg.feedback_store import load_or_build
from avglab.core.model import AvgCore
from avglab.core.selector import RouterInput
from avglab.stages.rglf import RglfStage

log = logging.getLogger(__name__)


def check_split_size(datamodule, split: str, samples: int) -> None:
    """Fails before any scoring when the split's shard manifests hold fewer than ``samples`` samples.

    Args:
        datamodule: the run's ``ShardDataModule`` (its ``split_size`` reads the converter manifests;
            None when a shard has none, and then only scoring can tell).
        split: "train" or "val".
        samples: ``stage.cache_<split>_samples``.

    Raises:
        ValueError: naming ``stage.cache_<split>_samples``, the count found and the fix.
    """
    size_of = getattr(datamodule, "split_size", None)
    size = size_of(split) if samples and size_of is not None else None
    if size is not None and size < samples:
        key = f"stage.cache_{split}_samples"
        raise ValueError(
            f"{key}={samples}, but the {split} shards hold only {size} samples (their manifests): "
            f"lower {key} to at most {size} (fewer if samples are skipped while reading)"
        )


class FeedbackCacheDataModule(L.LightningDataModule):
    """Train/val loaders over cached samples.

    Args:
        train: the cached training samples.
        val: cached validation samples, or None (validation off).
        batch_size: samples per batch.
        seed: shuffling seed of the training order (a new order every epoch).
        skipped: skip reasons met while the cache was built (reported as the run's skips).
        unknown: ``<unk>`` tokens and samples counted while the cache was built (reported as the run's).
    """

    def __init__(
        self,
        train: FeedbackCache,
        val: FeedbackCache | None,
        batch_size: int,
        seed: int,
        skipped=None,
        unknown=None,
    ):
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.skipped = skipped if skipped is not None else {}
        self.unknown = unknown if unknown is not None else {}

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return torch.utils.data.DataLoader(
            self.train, self.batch_size, shuffle=True, generator=generator, collate_fn=FeedbackCache.collate
        )

    @property
    def has_validation(self) -> bool:
        """Whether validation samples were cached (``stage.cache_val_samples`` > 0 and a val split)."""
        return self.val is not None

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
        wanted = {"train": self.stage.cache_train_samples, "val": self.stage.cache_val_samples}
        if not datamodule.urls.get("val"):
            wanted["val"] = 0
        for split, samples in wanted.items():  # both splits before any scoring
            check_split_size(datamodule, split, samples)
        caches = {}
        for split, samples in wanted.items():
            if not samples:
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
        text_only = int((~train.has_image).sum())
        if text_only:
            log.warning(
                "%d of the %d cached train samples are text-only: no routing preference (pitfall 7), "
                "they add nothing to the RGLF loss",
                text_only,
                len(train),
            )
        return FeedbackCacheDataModule(
            train,
            caches["val"],
            self.stage.batch_size or datamodule.batch_size,
            cfg.seed,
            skipped_counts(train.meta),
            unknown_counts(train.meta),
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
            grid=p.grid,  # the same spliced-length cut as training
            max_skip_fraction=datamodule.budget.max_fraction,
            shard_sizes=datamodule.shard_sizes,
            rank=0,
            world_size=1,
        )
        key = f"stage.cache_{split}_samples"
        tensors, facts = compute_cache(
            self.core, iter(reader.test_dataloader()), samples, key=key, skipped=reader.skipped
        )
        facts["skipped"] = dict(reader.skipped)
        facts["unknown"] = dict(reader.unknown)
        return tensors, facts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.global_step == 0 and batch_idx == 0:  # into the run's metrics.json (cost accounting)
            for name, value in self.cache_stats.items():
                self.log(name, value, batch_size=len(batch["feedback"]))
        return super().training_step(batch, batch_idx)

    def routed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits from cached inputs; cached feedback after ``stage.token_cost``.

        A batch of text-only samples has no tile: the router then gives zero logits that still
        depend on its parameters, as in ``stage=rglf``.
        """
        owner = batch["tile_owner"].to(self.device)
        tiles = batch["tiles"].to(self.device) if len(batch["tiles"]) else None
        encoded = self.core.pyramid(tiles, owner, batch["has_image"])
        inputs = RouterInput(
            encoded.levels, owner, batch["instruction"], batch["instruction_mask"], len(batch["feedback"])
        )
        logits = self.core.selector(inputs)
        tokens = batch["tokens"].to(self.device)
        return logits, self.priced(batch["feedback"], tokens), tokens
