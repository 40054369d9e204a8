"""WebDataset shards -> decode -> SampleProcessor -> collate, split across ranks and workers.

Skipped samples are counted by reason in ``ShardDataModule.skipped``: ``truncated_answer`` /
``truncated_image`` / template rules from the processor, a :class:`RecordError` reason for a
malformed record, ``truncated_shard`` (one per lost sample) or ``shard_cut_counts_unknown`` (one
per broken shard without a manifest count) for broken tar files, and the exception type for
other unreadable data (see :mod:`avglab.data.skips`). Loader workers send
their counts to the main process along with the batches, so the counter is complete with any
``num_workers``; above ``max_skip_fraction`` the loader stops the run. Kept samples with ``<unk>``
ids (words a word-level tokenizer lacks) travel the same way into ``ShardDataModule.unknown``.

The train stream's position (pass, samples each worker took, skip counts) is the datamodule's
``state_dict``, which Lightning stores in every checkpoint; a resumed run continues the stream exactly
where the checkpoint was taken (:mod:`avglab.data.resume`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
import webdataset as wds

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.ranks import gather_objects
from avglab.data.resume import (
    POSITION_KEY,
    PassCursor,
    PassShards,
    PassShuffle,
    Start,
    TrainBatches,
    batched,
    budget_counts,
    restore_counts,
)
from avglab.data.shard_samples import split_by_rank, to_model_sample
from avglab.data.skips import ShardReader, SkipBudget, SkipCounter, attach_skips
from avglab.data.templates import ChatTemplate

__all__ = ["ShardDataModule", "SkipCounter", "build_image_processor", "split_by_rank", "to_model_sample"]

log = logging.getLogger(__name__)


class ShardDataModule(L.LightningDataModule):
    """Train/val/test loaders over WebDataset shards of LLaVA-format records.

    Shards are split across ranks (every ``world_size``-th shard from ``rank``) and then across
    loader workers, so every sample of an eval split is seen exactly once. Each rank needs at least
    one shard; an eval split uses at most as many workers as its rank has shards, while training
    needs a shard per worker. The train split is shuffled (shards, then samples in a buffer;
    deterministic from ``seed``, different every epoch). With ``epoch_samples`` (or, on several
    ranks, the manifest's sample count) it repeats endlessly and an epoch is a fixed number of
    batches per rank, the same on every rank, so DDP never waits at the end of an epoch.
    ``state_dict``/``load_state_dict`` carry the train stream's position through checkpoints.

    Args:
        urls: shard paths or URLs per split ("train", "val", "test"); a split that is absent has
            no loader (no "val": validation is off).
        tokenizer: Hugging Face tokenizer with the image token.
        image_processor: ``LlavaNextImageProcessorPil`` (see :func:`build_image_processor`).
        template: chat template name or object.
        batch_size: train batch size per rank.
        eval_batch_size: val/test batch size per rank (defaults to ``batch_size``).
        num_workers: loader worker processes (0 = load in the main process).
        shuffle_buffer: samples in the train shuffle buffer (0 turns sample shuffling off).
        seed: shuffling seed.
        max_length: longest sequence in tokens, the visual tokens at the finest level included
            when ``grid`` is given (see :class:`SampleProcessor`).
        grid: tokens per tile side of the vision tower at full resolution (tile size / patch
            size), to count the visual tokens; None counts text tokens only.
        epoch_samples: train samples per epoch over all ranks (None = one pass over the shards).
        max_skip_fraction: stop when more than this fraction of a split's samples was skipped.
        shard_sizes: samples per shard url (from the converter's manifests), to count the samples
            a truncated shard lost and to size a distributed epoch.
        rank, world_size: this process's rank and the number of ranks (None: from the attached
            Trainer, else ``RANK``/``WORLD_SIZE`` or ``torch.distributed``).

    Attributes:
        skipped: ``Counter`` of skip reasons of this rank (all its workers).
        unknown: ``Counter`` of ``<unk>`` ids in kept samples of this rank: ``"tokens"`` and
            ``"samples"`` (both 0 for a byte-fallback tokenizer).
        budget: the :class:`~avglab.data.skips.SkipBudget` (kept/skipped per split).
        processor: the :class:`SampleProcessor`.
    """

    def __init__(
        self,
        urls: Mapping[str, Sequence[str]],
        tokenizer,
        image_processor,
        template: str | ChatTemplate = "vicuna_v1",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        max_length: int = 2048,
        grid: int | None = None,
        epoch_samples: int | None = None,
        max_skip_fraction: float = 0.01,
        shard_sizes: Mapping[str, int] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be >= 1 or None, got {epoch_samples}")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"give both rank and world_size, 0 <= rank < world_size: {rank}, {world_size}")
        self.urls = {split: list(paths) for split, paths in urls.items() if paths is not None}
        self.skipped: Counter = Counter()
        self.unknown: Counter = Counter(tokens=0, samples=0)
        self.budget = SkipBudget(
            self.skipped, max_skip_fraction, on_update=self._log_skips, unknown=self.unknown
        )
        self.processor = SampleProcessor(tokenizer, image_processor, template, max_length, grid=grid)
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before building the data")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_samples = epoch_samples
        self.shard_sizes = dict(shard_sizes or {})
        self.rank, self.world_size = rank, world_size
        self._lowered: set[str] = set()  # splits whose worker count was lowered (logged once)
        self._trained: dict | None = None  # position after the last train batch Lightning took
        self._start: Start | None = None  # where the next train loader starts: a checkpoint's position

    def train_dataloader(self) -> TrainBatches:
        """Shuffled train batches; exactly ``epoch_samples // (world * batch_size)`` per rank if set."""
        _, world = self._rank_world()
        batches = self._train_batches()
        if batches is None and world > 1:
            raise ValueError(
                f"training on {world} ranks needs data.epoch_samples (or shards with a manifest) so "
                "that every rank runs the same number of steps (shards split unevenly across ranks)"
            )
        return self._train_loader(batches)

    @property
    def has_validation(self) -> bool:
        """Whether a val split is configured (validation is off without one)."""
        return "val" in self.urls

    def val_dataloader(self) -> wds.WebLoader | list:
        """Validation batches in shard order (each sample once over all ranks); [] without a val split."""
        if "val" not in self.urls:
            log.info("no val split configured: validation is off")
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> wds.WebLoader:
        """Test batches in shard order (each sample once over all ranks)."""
        return self._eval_loader("test")

    def split_size(self, split: str) -> int | None:
        """Samples in a split according to the manifests, or None if a shard's count is unknown."""
        urls = self.urls.get(split) or []
        if not urls or any(u not in self.shard_sizes for u in urls):
            return None
        return sum(self.shard_sizes[u] for u in urls)

    def state_dict(self) -> dict:
        """The train stream's position after the last batch trained on, of every rank.

        Lightning calls this on every rank when it saves a checkpoint (rank 0 writes it), so on several
        ranks it is a collective that gathers each rank's position.
        """
        mine = self._trained
        if mine is not None:  # with every split's counts, the train split's as of the batch trained on
            mine = {**mine, "counts": budget_counts(self.budget, {"train": mine["train_counts"]})}
        return {"train_position": gather_objects(mine)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores this rank's skip and ``<unk>`` counts; the next train loader continues the stream."""
        positions = state_dict.get("train_position") or []
        rank, world = self._rank_world()
        mine = positions[rank] if len(positions) == world else None
        if mine is None:
            if any(p is not None for p in positions):  # trained on another number of ranks
                passes = max(p["pass"] for p in positions if p is not None)
                log.warning(
                    "the checkpoint's data position is for %d rank(s), this run has %d: training goes on "
                    "with a fresh pass over the shards (not the batches the interrupted run would have seen)",
                    len(positions), world,
                )  # fmt: skip
                self._start = Start(passes + 1)
            return
        layout = mine["layout"]
        expected = self._layout()
        restore_counts(self.budget, mine["counts"])
        self._trained = mine
        if layout != expected:
            log.warning(
                "the checkpoint's data position was taken with %s, this run has %s: training goes on with a "
                "fresh pass over the shards (not the batches the interrupted run would have seen)",
                layout, expected,
            )  # fmt: skip
            self._start = Start(mine["pass"] + 1)
            return
        self._start = Start.after(mine, self._train_batches())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Takes the position off a train batch: Lightning trains on this batch next."""
        if isinstance(batch, dict) and POSITION_KEY in batch:
            self._trained = batch.pop(POSITION_KEY)
        return batch

    def teardown(self, stage: str) -> None:
        """Reports the skipped samples and unknown tokens of this rank."""
        if self.skipped or self.unknown["tokens"]:
            log.warning("skipped samples and unknown tokens: %s", self.budget.summary())

    def _log_skips(self, split: str) -> None:
        """Sends a split's skip and unknown-token counts to the Trainer's logger as they arrive."""
        trainer = self.trainer
        if trainer is None or trainer.logger is None:
            return
        stats = self.budget.summary()[split]
        metrics = {f"data/{split}_skipped/{reason}": float(n) for reason, n in stats["reasons"].items()}
        metrics[f"data/{split}_skipped_fraction"] = self.budget.fraction(split)
        metrics[f"data/{split}_unknown_tokens"] = float(stats["unknown_tokens"])
        metrics[f"data/{split}_unknown_samples"] = float(stats["unknown_samples"])
        trainer.logger.log_metrics(metrics, step=trainer.global_step)

    def _rank_world(self) -> tuple[int, int]:
        """(rank, world size): explicit, else the Trainer's, else webdataset's (env or torch.distributed)."""
        if self.world_size is not None:
            return self.rank, self.world_size
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return rank, world

    def _eval_loader(self, split: str) -> wds.WebLoader:
        """An evaluation split's webdataset pipeline in shard order, skips tallied in the main process."""
        urls = self._checked_urls(split)
        rank, world = self._rank_world()
        counter: Counter = Counter()  # the worker's own; its counts travel with the batches
        unknown: Counter = Counter()
        stages = [
            wds.SimpleShardList(urls),
            partial(split_by_rank, rank=rank, world_size=world),
            wds.split_by_worker,
            ShardReader(counter, self.shard_sizes),
            *self._sample_stages(counter, unknown),
            wds.batched(self.eval_batch_size, collation_fn=self._collate, partial=True),
            partial(attach_skips, skipped=counter, unknown=unknown),
        ]
        workers = self.workers(split, len(urls), train=False)
        loader = wds.WebLoader(
            wds.DataPipeline(*stages),
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(self.seed),  # validation leaves torch's global RNG alone
        )
        return loader.compose(partial(self.budget.absorb, split))

    def _train_loader(self, batches: int | None) -> TrainBatches:
        """The train split's pipeline, pass by pass: shards and samples shuffled by ``seed + pass``.

        Args:
            batches: batches per epoch (None: an epoch is one pass).
        """
        urls = self._checked_urls("train")
        rank, world = self._rank_world()
        counter: Counter = Counter()
        unknown: Counter = Counter()
        start = self._start or self._after_trained()  # a checkpoint's position is used once
        self._start = None
        shards = PassShards(urls, rank, world, self.seed, start)
        cursor = PassCursor(shards, (counter, unknown))
        stages = [shards, ShardReader(counter, self.shard_sizes)]
        if self.shuffle_buffer > 0:
            stages.append(PassShuffle(shards, self.shuffle_buffer, min(self.shuffle_buffer, 100), self.seed))
        stages += [
            cursor,
            *self._sample_stages(counter, unknown),
            partial(batched, size=self.batch_size, collate=self._collate),  # sent when full: see resume
            partial(attach_skips, skipped=counter, unknown=unknown),
            cursor.tag,
        ]
        workers = self.workers("train", len(urls), train=True)
        return TrainBatches(
            wds.DataPipeline(*stages),
            shards,
            workers,
            self.budget,
            "train",
            batches,
            self._layout(),
            stamp=self.trainer is not None,  # Lightning takes the positions off (on_before_batch_transfer)
        )

    def _after_trained(self) -> Start:
        """A new train loader of this run: the pass after the last one trained on (pass 0 at first)."""
        return Start() if self._trained is None else Start(self._trained["pass"] + 1)

    def _sample_stages(self, counter: Counter, unknown: Counter) -> list:
        """Worker stages from raw to model samples (decode, process), skips into the worker's counters."""
        p = self.processor
        processor = SampleProcessor(
            p.tokenizer, p.image_processor, p.template, p.max_length, counter, grid=p.grid, unknown=unknown
        )
        handler = SkipCounter(counter)
        return [
            wds.decode("pil", handler=handler),
            wds.map(partial(to_model_sample, processor=processor), handler=handler),
        ]

    @property
    def _collate(self):
        """The collate function with this tokenizer's pad id."""
        return partial(collate, pad_token_id=self.pad_token_id)

    def _train_batches(self) -> int | None:
        """Train batches per epoch on this rank (None: an epoch is one pass; on several ranks, unknown)."""
        _, world = self._rank_world()
        epoch_samples = self.epoch_samples
        if epoch_samples is None and world > 1:
            epoch_samples = self.split_size("train")
        return None if epoch_samples is None else max(1, epoch_samples // (world * self.batch_size))

    def _layout(self) -> dict:
        """What a train position is only valid for: rank, ranks, loader workers, shards, batch size."""
        rank, world = self._rank_world()
        shards = len(self.urls.get("train") or [])
        return {
            "rank": rank,
            "world": world,
            "workers": self.num_workers,
            "shards": shards,
            "batch": self.batch_size,
        }

    def _checked_urls(self, split: str) -> list[str]:
        """The split's shards, failing early and clearly on missing files or too few shards."""
        urls = self.urls.get(split) or []
        if not urls:
            raise ValueError(
                f"no {split} shards given: set data.{split}_shards or pass urls[{split!r}] (write shards)"
            )
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {split} shard(s) missing, e.g. {missing[0]}; regenerate or reconvert"
            )
        _, world = self._rank_world()
        if len(urls) < world:
            raise ValueError(
                f"{split} has {len(urls)} shard(s) but {world} ranks each need one: write smaller shards"
            )
        return urls

    def workers(self, split: str, shards: int, train: bool) -> int:
        """Loader workers of one split on this rank: ``num_workers``, for evaluation at most one per shard.

        An unshuffled evaluation pass reads each shard once whatever the worker count, so it takes
        the workers this rank's shards allow (a small benchmark is often a single shard). Training
        keeps the error instead: every worker shuffles and repeats its own shards, so a silently
        lower count would change a configured run's sample order and throughput.

        Raises:
            ValueError: for training with fewer shards than ranks x ``num_workers``.
        """
        rank, world = self._rank_world()
        if train and shards < world * max(1, self.num_workers):  # judged on the total: every rank agrees
            raise ValueError(
                f"{split} has {shards} shard(s) but {world} rank(s) x data.num_workers={self.num_workers} "
                "training readers each need one: convert with smaller shards (--shard-samples) or use fewer "
                "data.num_workers"
            )
        own = len(range(rank, shards, world))  # shards this rank reads (split_by_rank)
        workers = min(self.num_workers, own)
        if workers < self.num_workers and split not in self._lowered:
            self._lowered.add(split)
            log.info(
                "%s: %d shard(s) on rank %d, so %d loader worker(s) instead of data.num_workers=%d",
                split, own, rank, workers, self.num_workers,
            )  # fmt: skip
        return workers
