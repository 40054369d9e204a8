"""Where a rank's train stream stands, and how a restarted run continues from exactly there.

A rank's train stream is a sequence of *passes*: each ``iter()`` of its ``DataLoader`` reads the rank's
shards once, and pass ``p`` shuffles them (shard order, then a sample buffer) with the seed ``seed + p``
alone, as ``webdataset.detshuffle`` numbers its epochs. A training epoch (``epoch_samples``) takes a fixed
number of batches and starts a new pass; without it an epoch is one pass.

Loader workers each read their own shards; the ``DataLoader`` hands out their items round robin
(worker 0, 1, ..., then again; a worker whose shards are done drops out). Every item carries a tag
``(worker, taken, ended)``: the samples its worker has taken from the shuffle so far, and whether its
stream had ended. The main process keeps these per worker (:class:`TrainBatches`) and stamps every batch
with a snapshot: the pass, each worker's tag, the worker of the last item, the batches of the epoch and
the split's skip and ``<unk>`` counts. The datamodule keeps the snapshot of the last batch Lightning
trained on, which its checkpoint stores (with the other splits' counts as they are then).

Resuming pass ``p`` from a snapshot, each worker drops the samples it had taken (right after the shuffle,
before anything is decoded) and goes on; the workers are renumbered so that the one after the last item's
comes first, which continues the round robin where it stopped. The batches, their order and the skip
counts that follow are then exactly those of the run that was not interrupted.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import webdataset as wds
from torch.utils.data import IterableDataset

log = logging.getLogger(__name__)

POSITION_KEY = "__position__"  # worker -> main: an item's tag; main -> Lightning: a batch's snapshot
SHARD_SHUFFLE_INITIAL = 100  # webdataset.detshuffle's default ``initial``, as the shard shuffle always used


@dataclass
class Start:
    """Where a rank's stream starts: a fresh pass, or a pass resumed from a snapshot.

    Attributes:
        pass_index: the first pass (its shuffle seed is ``seed + pass_index``).
        workers: per loader worker of a resumed pass, ``[samples taken, stream ended]``; None: a fresh pass.
        rotation: the resumed pass's worker 0 reads as worker ``rotation`` (the round robin goes on there).
        epoch_batches: batches of the current epoch already trained on.
    """

    pass_index: int = 0
    workers: list[list] | None = None
    rotation: int = 0
    epoch_batches: int = 0

    @classmethod
    def after(cls, snapshot: dict, batches: int | None) -> Start:
        """The continuation of a snapshot; a finished epoch (``batches`` per epoch) starts the next pass."""
        if batches is not None and snapshot["epoch_batches"] >= batches:
            return cls(snapshot["pass"] + 1)
        last, workers = snapshot["last"], snapshot["workers"]
        rotation = 0 if last is None else (last + 1) % len(workers)
        return cls(snapshot["pass"], [list(w) for w in workers], rotation, snapshot["epoch_batches"])


class PassShards(IterableDataset):
    """First stage of a rank's train pipeline: each ``iter()`` starts a pass and yields its shards, shuffled.

    The shards are every ``world``-th of ``urls`` from ``rank``, then every ``workers``-th of those from the
    worker's number (as ``split_by_rank`` and ``webdataset.split_by_worker``), shuffled with seed
    ``seed + pass``. ``current`` tells the later stages of the same pass its number and where to start.

    Args:
        urls: all shards of the split.
        rank, world: this rank and the number of ranks.
        seed: the shuffle seed.
        start: where this process's first pass starts (later passes are fresh).
    """

    def __init__(self, urls: Sequence[str], rank: int, world: int, seed: int, start: Start):
        super().__init__()
        self.urls, self.rank, self.world, self.seed, self.start = list(urls), rank, world, seed, start
        self.passes = 0  # passes this process started (a persistent worker keeps counting)
        self.current: PassInfo | None = None

    def __iter__(self) -> Iterator[dict]:  # eager (not a generator): later stages read ``current`` at once
        worker, workers = wds.utils.pytorch_worker_info()[2:]
        resumed = self.passes == 0 and self.start.workers is not None
        if resumed:
            worker = (worker + self.start.rotation) % workers
        taken, ended = self.start.workers[worker] if resumed else (0, False)
        self.current = PassInfo(self.start.pass_index + self.passes, worker, 0 if ended else taken)
        self.passes += 1
        mine = [{"url": u} for u in self.urls[self.rank :: self.world][worker::workers]]
        shuffle = wds.detshuffle(
            len(self.urls), SHARD_SHUFFLE_INITIAL, self.seed, epoch=self.current.index - 1
        )
        return shuffle.run(iter([] if ended else mine))  # an ended worker has nothing left in this pass


@dataclass
class PassInfo:
    """The pass a worker is in: its number, the worker's number in it, the samples it drops first."""

    index: int
    worker: int
    skip: int = 0


class PassShuffle:
    """Pipeline stage: the sample shuffle buffer, seeded ``seed + pass`` (``webdataset.detshuffle``)."""

    def __init__(self, shards: PassShards, bufsize: int, initial: int, seed: int):
        self.shards, self.bufsize, self.initial, self.seed = shards, bufsize, initial, seed

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        """``samples`` shuffled with this pass's seed."""
        epoch = self.shards.current.index - 1  # detshuffle.run counts one up before seeding
        return wds.detshuffle(self.bufsize, self.initial, self.seed, epoch=epoch).run(samples)


class PassCursor:
    """Worker stages: count the samples taken from the shuffle, drop a resumed pass's first ones, tag items.

    Every item gets ``(worker, taken, ended)``. Dropping happens before decoding: resuming costs reading
    the tar files, not processing images. The counters are the worker's skip and ``<unk>`` tallies; what
    they gathered while dropping (e.g. a truncated shard met before the resume point) was counted before
    the interruption, so they are cleared.

    Args:
        shards: the pipeline's first stage (the pass and where this worker starts in it).
        counters: the worker's tallies to clear once the dropped samples are behind.
    """

    def __init__(self, shards: PassShards, counters: Sequence[Counter] = ()):
        self.shards, self.counters = shards, tuple(counters)
        self.taken, self.ended, self._skip = 0, False, 0

    def __call__(self, samples: Iterable[dict]) -> Iterator[dict]:
        """The pass's samples after the ones to drop, counted."""
        self.taken, self.ended, self._skip = 0, False, self.shards.current.skip
        return self._count(samples)

    def _count(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            self.taken += 1
            if self.taken <= self._skip:
                if self.taken == self._skip:
                    self._clear()
                continue
            yield sample
        if self.taken < self._skip:
            self._clear()
            warnings.warn(
                f"resumed pass {self.shards.current.index}: worker {self.shards.current.worker} found only "
                f"{self.taken} of its {self._skip} samples taken (the shards changed since the checkpoint)",
                stacklevel=2,
            )
        self.ended = True

    def _clear(self) -> None:
        for counter in self.counters:
            counter.clear()

    def tag(self, items: Iterable[dict]) -> Iterator[dict]:
        """Last worker stage: ``(worker, taken, ended)`` on every item (batches and end-of-stream counts)."""
        for item in items:
            item[POSITION_KEY] = (self.shards.current.worker, self.taken, self.ended)
            yield item


def batched(samples: Iterable[dict], size: int, collate: Callable[[list[dict]], dict]) -> Iterator[dict]:
    """Pipeline stage: batches of ``size`` (the last one smaller), each sent on as soon as it is full.

    ``webdataset.batched`` makes the same batches but reads (and processes) one sample ahead before it
    sends a full one; here the samples a worker has taken when a batch leaves are exactly those of its
    batches so far, which is what a resumed pass drops.
    """
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield collate(batch)
            batch = []
    if batch:
        yield collate(batch)


def split_counts(budget, split: str) -> dict:
    """One split's tallies in a :class:`~avglab.data.skips.SkipBudget`, as plain dicts."""
    return {
        "kept": budget.kept[split],
        "dropped": budget.dropped[split],
        "reasons": dict(budget.by_split.get(split, {})),
        "unknown": dict(budget.unknown_by_split.get(split, {})),
    }


def budget_counts(budget, replace: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every split's tallies (:func:`split_counts`), those of the splits in ``replace`` taken from there.

    The train split's come from the position of the last batch trained on: the loader may have read
    further (Lightning fetches ahead), while validation's are up to date when the checkpoint is saved.
    """
    splits = set(budget.kept) | set(budget.by_split) | set(budget.unknown_by_split) | set(replace or {})
    return {s: (replace or {}).get(s) or split_counts(budget, s) for s in sorted(splits)}


def restore_counts(budget, counts: dict[str, dict]) -> None:
    """Sets a budget's tallies to ``counts`` (:func:`budget_counts`), in place: the datamodule shares them.

    The totals over splits (``budget.skipped``, ``budget.unknown``) are the sums of the splits'.
    """
    for tallies in (budget.kept, budget.dropped, budget.by_split, budget.unknown_by_split, budget.skipped):
        tallies.clear()
    for key in budget.unknown:
        budget.unknown[key] = 0  # keep the keys the datamodule reports (tokens, samples)
    for split, c in counts.items():
        budget.kept[split], budget.dropped[split] = c["kept"], c["dropped"]
        if c["reasons"]:
            budget.by_split[split] = Counter(c["reasons"])
            budget.skipped.update(c["reasons"])
        if c["unknown"]:
            budget.unknown_by_split[split] = Counter(c["unknown"])
            budget.unknown.update(c["unknown"])


class TrainBatches:
    """Lightning's train loader of one rank: pipeline passes, ``batches`` per epoch, the stream's position.

    Args:
        pipeline: the worker-side ``DataPipeline``, starting with ``shards`` and ending with a
            :meth:`PassCursor.tag` stage.
        shards: its first stage.
        workers: loader worker processes (0: the main process reads).
        budget: the :class:`~avglab.data.skips.SkipBudget` that takes the skip counts off the items.
        split: the split's name in the budget.
        batches: batches per epoch, the same on every rank; None: an epoch is one pass.
        layout: what a snapshot is only valid for (rank, world, workers, shards), stored with it.
        stamp: put a snapshot on every batch (under ``POSITION_KEY``) for the datamodule to keep.
    """

    def __init__(
        self,
        pipeline: wds.DataPipeline,
        shards: PassShards,
        workers: int,
        budget,
        split: str,
        batches: int | None,
        layout: dict,
        stamp: bool,
    ):
        # Its own generator: iter() draws the workers' base seed from it, not from torch's global RNG,
        # which a resumed run must find exactly as the checkpoint left it.
        generator = torch.Generator().manual_seed(shards.seed)
        self.loader = wds.WebLoader(
            pipeline,
            batch_size=None,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
        ).compose(self._absorb)
        self.start = shards.start
        self.budget, self.split, self.batches, self.layout, self.stamp = budget, split, batches, layout, stamp
        self.slots = max(1, workers)
        resumed = [list(w) for w in self.start.workers] if self.start.workers is not None else None
        self.position = {"pass": self.start.pass_index, "workers": resumed or self.fresh(), "last": None}
        self.passes = 0  # DataLoader iterations started: the workers count the same
        self.resumed = False

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("an epoch is one pass over the shards: its length is not known")
        return self.batches

    def __iter__(self) -> Iterator[dict]:
        return self._epoch()  # a generator: Lightning's iter() to check the loader starts no pass

    def _epoch(self) -> Iterator[dict]:
        """One epoch: ``batches`` (the rest of a resumed epoch), over as many passes as it takes."""
        done = self.start.epoch_batches if self.passes == 0 else 0
        while self.batches is None or done < self.batches:
            self._begin_pass()
            for batch in self.loader:  # one pass: one iter() of the DataLoader
                done += 1
                if self.stamp:
                    batch[POSITION_KEY] = self.snapshot(done)
                yield batch
                if self.batches is not None and done >= self.batches:
                    return  # never touch the next item: it could start a pass the workers would count
            if self.batches is None:
                return

    def _begin_pass(self) -> None:
        self.resumed = self.passes == 0 and self.start.workers is not None
        if self.passes > 0:
            self.position = {"pass": self.position["pass"] + 1, "workers": self.fresh(), "last": None}
        self.passes += 1

    def fresh(self) -> list[list]:
        """Every worker at the start of a pass: nothing taken, not ended."""
        return [[0, False] for _ in range(self.slots)]

    def _absorb(self, items: Iterable[dict]) -> Iterator[dict]:
        """Main-process stage: reads the tags; the skip budget takes the counts off and yields the batches."""
        return self.budget.absorb(self.split, self._read(items), resumed=self.resumed)

    def _read(self, items: Iterable[dict]) -> Iterator[dict]:
        for item in items:
            worker, taken, ended = item.pop(POSITION_KEY)
            self.position["workers"][worker] = [taken, ended]
            self.position["last"] = worker
            yield item

    def snapshot(self, epoch_batches: int) -> dict:
        """The position after the batch just read: a plain dict, as checkpoints store it."""
        return {
            "pass": self.position["pass"],
            "workers": [list(w) for w in self.position["workers"]],
            "last": self.position["last"],
            "epoch_batches": epoch_batches,
            "train_counts": split_counts(self.budget, self.split),
            "layout": dict(self.layout),
        }
