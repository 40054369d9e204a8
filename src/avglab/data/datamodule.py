"""WebDataset shards -> decode -> SampleProcessor -> collate, split across ranks and workers.

Skipped samples are counted by reason in ``ShardDataModule.skipped``: ``truncated_answer`` /
``truncated_image`` from the processor, a :class:`RecordError` reason for a malformed record, and
the exception type for unreadable data (broken image, bad json, unreadable shard). With
``num_workers > 0`` the counting happens in the worker processes, so the main process's counter
stays empty (the warnings still show every skip).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import webdataset as wds
from PIL import Image
from webdataset.autodecode import DecodingError

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.templates import ChatTemplate

__all__ = ["ShardDataModule", "SkipCounter", "build_image_processor", "to_model_sample"]

log = logging.getLogger(__name__)
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


class SkipCounter:
    """A webdataset exception handler that counts, warns and continues (picklable for workers).

    Only data errors are skipped (bad records, undecodable images or json, unreadable shards:
    ``ValueError``, ``KeyError``, ``OSError``, webdataset's ``DecodingError``); anything else is
    a bug and is raised.
    """

    def __init__(self, skipped: Counter):
        self.skipped = skipped

    def __call__(self, exn: Exception) -> bool:
        """Counts ``exn`` under its reason and tells webdataset to go on with the next sample."""
        if isinstance(exn, DecodingError):
            reason, detail = "undecodable", f"field .{exn.k} of {exn.key!r} in {exn.url}: {exn.__cause__!r}"
        elif isinstance(exn, ValueError | KeyError | OSError):
            reason, detail = getattr(exn, "reason", type(exn).__name__), str(exn)
        else:
            raise exn
        self.skipped[reason] += 1
        warnings.warn(f"skipped a sample ({reason}): {detail}", stacklevel=2)
        return True


def to_model_sample(sample: dict, processor: SampleProcessor) -> dict | None:
    """A decoded shard sample (``json`` record and optional image) -> processed tensors or None."""
    if "json" not in sample:
        raise KeyError(f"shard sample {sample.get('__key__')!r} has no .json record")
    record = dict(sample["json"])
    record.setdefault("id", sample.get("__key__", ""))
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is not None and not isinstance(image, Image.Image):
        raise ValueError(
            f"shard sample {record['id']!r}: image was not decoded to PIL ({type(image).__name__})"
        )
    return processor(record, image)


class ShardDataModule(L.LightningDataModule):
    """Train/val/test loaders over WebDataset shards of LLaVA-format records.

    Shards are split across ranks (``split_by_node``) and then across loader workers, so every
    sample of an eval split is seen exactly once; each rank and worker needs at least one shard.
    The train split is shuffled (shards, then samples in a buffer; deterministic from ``seed``,
    different every epoch). With ``epoch_samples`` it repeats endlessly and an epoch is a fixed
    number of batches per rank, the same on every rank (required when training on several ranks).

    Args:
        urls: shard paths or URLs per split ("train", "val", "test").
        tokenizer: Hugging Face tokenizer with the image token.
        image_processor: ``LlavaNextImageProcessorPil`` (see :func:`build_image_processor`).
        template: chat template name or object.
        batch_size: train batch size per rank.
        eval_batch_size: val/test batch size per rank (defaults to ``batch_size``).
        num_workers: loader worker processes (0 = load in the main process).
        shuffle_buffer: samples in the train shuffle buffer (0 turns sample shuffling off).
        seed: shuffling seed.
        max_length: longest text sequence in tokens (see :class:`SampleProcessor`).
        epoch_samples: train samples per epoch over all ranks (None = one pass over the shards).

    Attributes:
        skipped: ``Counter`` of skip reasons (counts of this process only).
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
        epoch_samples: int | None = None,
    ):
        super().__init__()
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size} and {eval_batch_size}")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be >= 1 or None, got {epoch_samples}")
        self.urls = {split: list(paths) for split, paths in urls.items()}
        self.skipped: Counter = Counter()
        self.processor = SampleProcessor(
            tokenizer, image_processor, template, max_length, skipped=self.skipped
        )
        self.pad_token_id = tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; set tokenizer.pad_token before building the data")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch_samples = epoch_samples

    def train_dataloader(self) -> wds.WebLoader:
        """Shuffled train batches; exactly ``epoch_samples // (world * batch_size)`` per rank if set."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.epoch_samples is None and world > 1:
            raise ValueError(
                f"training on {world} ranks needs data.epoch_samples so that every rank runs the same "
                "number of steps (shards split unevenly across ranks)"
            )
        loader = self._loader("train", self.batch_size, train=True)
        if self.epoch_samples is None:
            return loader
        batches = max(1, self.epoch_samples // (world * self.batch_size))
        return loader.with_epoch(batches).with_length(batches, silent=True)

    def val_dataloader(self) -> wds.WebLoader:
        """Validation batches in shard order (each sample once over all ranks)."""
        return self._loader("val", self.eval_batch_size, train=False)

    def test_dataloader(self) -> wds.WebLoader:
        """Test batches in shard order (each sample once over all ranks)."""
        return self._loader("test", self.eval_batch_size, train=False)

    def teardown(self, stage: str) -> None:
        """Reports the skipped samples of this process."""
        if self.skipped:
            log.warning("skipped samples by reason: %s", dict(self.skipped))

    def _loader(self, split: str, batch_size: int, train: bool) -> wds.WebLoader:
        """The webdataset pipeline of one split, batched in the workers."""
        urls = self._checked_urls(split)
        handler = SkipCounter(self.skipped)
        dataset = wds.WebDataset(
            urls,
            shardshuffle=len(urls) if train else False,
            detshuffle=True,  # seed + epoch: reproducible, yet a new order every epoch
            seed=self.seed,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=handler,
        )
        if train and self.shuffle_buffer > 0:
            dataset = dataset.compose(
                wds.detshuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), self.seed)
            )
        dataset = (
            dataset.decode("pil", handler=handler)
            .map(partial(to_model_sample, processor=self.processor), handler=handler)
            .batched(batch_size, collation_fn=partial(collate, pad_token_id=self.pad_token_id), partial=True)
        )
        workers = self.num_workers
        return wds.WebLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0)

    def _checked_urls(self, split: str) -> list[str]:
        """The split's shards, failing early and clearly on missing files or too few shards."""
        urls = self.urls.get(split) or []
        if not urls:
            raise ValueError(f"no {split} shards given: pass urls[{split!r}] (write shards first)")
        local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} {split} shard(s) missing, e.g. {missing[0]}; regenerate or reconvert"
            )
        readers = (self.trainer.world_size if self.trainer is not None else 1) * max(1, self.num_workers)
        if len(urls) < readers:
            raise ValueError(
                f"{split} has {len(urls)} shard(s) but {readers} readers (ranks x workers) each need one: "
                "write smaller shards or use fewer data.num_workers"
            )
        return urls
