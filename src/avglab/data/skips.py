"""Skipped samples: counted where they happen (loader workers), judged where the run is (main process).

A loader worker counts every skip by reason in its own ``Counter``; :func:`attach_skips` sends the
new counts along with each batch (and once more at the end of the worker's stream), and
:class:`SkipBudget` takes them out again in the main process before the batch reaches the model,
so the batch contract is unchanged and the main process sees every worker's skips. There the
budget stops the run once more than ``max_fraction`` of a split's samples were skipped. The
``<unk>`` ids of kept samples (``"tokens"``, ``"samples"``) travel the same way and are tallied
beside the skips: counted, logged and reported, never silent.
"""

from __future__ import annotations

import logging
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import webdataset as wds
from webdataset.autodecode import DecodingError

log = logging.getLogger(__name__)

SKIP_KEY = "__skipped__"  # rides on a batch from a worker to the main process and is removed there
UNKNOWN_KEY = "__unknown__"  # the worker's <unk> counts, likewise
DATA_ERRORS = (ValueError, KeyError, OSError, tarfile.TarError)
COUNTS_UNKNOWN = "shard_cut_counts_unknown"  # counts broken shards, not samples: their loss is unknown
TAR_BLOCK = 512


class SkipLimitError(RuntimeError):
    """More samples were skipped than the configured fraction allows."""


def skip_reason(exn: Exception) -> tuple[str, str]:
    """The reason a data error is counted under, and a detail for the warning.

    Raises:
        Exception: ``exn`` itself when it is not a data error (a bug must not be skipped).
    """
    if isinstance(exn, DecodingError):
        cause = exn.__cause__
        reason = "non_utf8_text" if isinstance(cause, UnicodeDecodeError) else "undecodable"
        return reason, f"field .{exn.k} of {exn.key!r} in {exn.url}: {cause!r}"
    if isinstance(exn, DATA_ERRORS):
        return getattr(exn, "reason", type(exn).__name__), str(exn)
    raise exn


class SkipCounter:
    """A webdataset exception handler that counts, warns and continues (picklable for workers).

    Only data errors are skipped (bad records, undecodable images or json, unreadable shards:
    ``ValueError``, ``KeyError``, ``OSError``, ``tarfile.TarError``, webdataset's
    ``DecodingError``); anything else is a bug and is raised.
    """

    def __init__(self, skipped: Counter):
        self.skipped = skipped

    def __call__(self, exn: Exception) -> bool:
        """Counts ``exn`` under its reason and tells webdataset to go on with the next sample."""
        reason, detail = skip_reason(exn)
        self.skipped[reason] += 1
        warnings.warn(f"skipped a sample ({reason}): {detail}", stacklevel=2)
        return True


class ShardReader:
    """Pipeline stage: shard urls -> samples (webdataset's ``tarfile_to_samples``), one shard at a time.

    A truncated or unreadable shard loses the samples after the break. When the shard's sample
    count is known (from the ``<split>.manifest.json`` the converter and the synth generator write)
    the lost ones are counted one by one under ``truncated_shard``, which also catches a shard cut
    exactly between two samples (tarfile reads that without an error). Without a count (a foreign
    shard set) the loss cannot be known: a broken shard, or a local one without tar's end-of-archive
    blocks (cut between samples), counts once per shard under ``shard_cut_counts_unknown`` and the
    warning says the number of samples lost is unknown.

    Args:
        skipped: the worker's counter.
        sizes: samples per shard url, where known.
    """

    def __init__(self, skipped: Counter, sizes: Mapping[str, int] | None = None):
        self.skipped = skipped
        self.sizes = dict(sizes or {})

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        """Yields the samples of every shard in ``shards`` (dicts with a ``url``)."""
        for shard in shards:
            errors: list[Exception] = []
            read = 0
            for sample in wds.tarfile_to_samples(handler=_collect(errors))([shard]):
                read += 1
                yield sample
            self._account(shard["url"], read, errors)

    def _account(self, url: str, read: int, errors: list[Exception]) -> None:
        """Counts what a shard lost (a partial last sample is counted downstream by its own reason)."""
        expected = self.sizes.get(url)
        if expected is None:
            self._account_unknown(url, read, errors)
            return
        lost = max(expected - read, 0)
        if not lost:
            return
        self.skipped["truncated_shard"] += lost
        cause = f" ({errors[0]!r})" if errors else ""
        warnings.warn(
            f"skipped {lost} sample(s) (truncated_shard): shard {url} gave {read} of {expected} "
            f"samples{cause}; re-convert or re-copy it",
            stacklevel=2,
        )

    def _account_unknown(self, url: str, read: int, errors: list[Exception]) -> None:
        """A shard without a known count: a broken one is counted once, and said to lose an unknown number."""
        cut = not errors and cut_short(url)
        if not errors and not cut:
            return
        self.skipped[COUNTS_UNKNOWN] += 1
        cause = f"{errors[0]!r}" if errors else "no end-of-archive blocks: cut between two samples"
        warnings.warn(
            f"shard {url} is broken ({cause}) after {read} samples; no *.manifest.json gives its sample "
            f"count, so the samples lost are unknown (counts unknown): counted once under {COUNTS_UNKNOWN}. "
            "Re-copy it, or convert the data with python -m avglab.data.convert for exact counts",
            stacklevel=2,
        )


def cut_short(url: str) -> bool:
    """Whether a local tar file lacks the two zero blocks every tar writer ends with (False: can't tell).

    Python's tarfile reads a file cut between two members without an error; the missing end-of-archive
    blocks are what is left to tell.
    """
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if "://" in str(path) or not path.is_file():
        return False
    size = path.stat().st_size
    if size % TAR_BLOCK or size < 2 * TAR_BLOCK:
        return True
    with open(path, "rb") as f:
        f.seek(size - 2 * TAR_BLOCK)
        return f.read(2 * TAR_BLOCK).strip(b"\0") != b""


def _collect(errors: list[Exception]) -> Callable[[Exception], bool]:
    """A handler that records a shard's read errors and lets the reader go on with the next shard."""

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return True

    return handler


def attach_skips(batches: Iterable[dict], skipped: Counter, unknown: Counter | None = None) -> Iterator[dict]:
    """Worker-side stage: puts the skips (and ``<unk>`` counts) since the last batch on each batch.

    A final batch holding only the counts is sent when the stream ends, so skips after the last
    real batch are not lost.
    """
    unknown = Counter() if unknown is None else unknown
    for batch in batches:
        batch[SKIP_KEY], batch[UNKNOWN_KEY] = _take(skipped), _take(unknown)
        yield batch
    if skipped or unknown:
        yield {SKIP_KEY: _take(skipped), UNKNOWN_KEY: _take(unknown)}


def _take(skipped: Counter) -> dict[str, int]:
    """The counts so far, leaving the counter empty."""
    counts = dict(skipped)
    skipped.clear()
    return counts


class SkipBudget:
    """Main-process tally of kept and skipped samples per split, with the stop rule.

    Args:
        skipped: counter of skip reasons over all splits (``ShardDataModule.skipped``).
        max_fraction: largest tolerated skipped / (kept + skipped) of a split, in [0, 1].
        min_samples: samples a split must have read before the fraction is judged mid-pass
            (the end of a pass is always judged), so one early bad sample does not stop a run.
        on_update: called with the split name after new skips or unknown tokens arrived (e.g. to
            log them).
        unknown: counter of ``<unk>`` ids in kept samples over all splits (``"tokens"``,
            ``"samples"``; ``ShardDataModule.unknown``).
    """

    def __init__(
        self,
        skipped: Counter,
        max_fraction: float,
        min_samples: int = 200,
        on_update: Callable[[str], None] | None = None,
        unknown: Counter | None = None,
    ):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_fraction}")
        self.skipped = skipped
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.on_update = on_update
        self.kept: Counter = Counter()
        self.dropped: Counter = Counter()
        self.by_split: dict[str, Counter] = {}
        self.unknown = Counter() if unknown is None else unknown
        self.unknown_by_split: dict[str, Counter] = {}
        self._warned_unknown: set[str] = set()

    def absorb(self, split: str, items: Iterable[dict], resumed: bool = False) -> Iterator[dict]:
        """Main-process stage: takes the counts off each batch, checks the budget, yields real batches.

        Args:
            split: the split's name.
            items: a pass's items from the loader.
            resumed: the items are the rest of a pass begun before a restart (it may have none left).

        Raises:
            SkipLimitError: above ``max_fraction``.
            ValueError: when a whole pass over this rank's shards gave no sample at all.
        """
        batches = 0
        for item in items:
            counts, unknown = item.pop(SKIP_KEY, None), item.pop(UNKNOWN_KEY, None)
            self.kept[split] += len(item.get("ids", ()))  # empty: the end-of-stream counts of a worker
            if counts:
                self.add(split, counts)
            if unknown:
                self.add_unknown(split, unknown)
            self.check(split, final=False)
            if item:
                batches += 1
                yield item
        self.check(split, final=True)
        self.warn_unknown(split)
        if not batches and not resumed:
            reasons = dict(self.by_split.get(split, {}))
            raise ValueError(
                f"the {split} split gave no samples on this rank (skipped: {reasons}); "
                "check the shards and the logged skip reasons"
            )

    def add(self, split: str, counts: Mapping[str, int]) -> None:
        """Adds skip counts of ``split``."""
        self.skipped.update(counts)
        self.by_split.setdefault(split, Counter()).update(counts)
        self.dropped[split] += sum(counts.values())
        if self.on_update is not None:
            self.on_update(split)

    def add_unknown(self, split: str, counts: Mapping[str, int]) -> None:
        """Adds ``<unk>`` counts (``"tokens"``, ``"samples"``) of ``split``."""
        self.unknown.update(counts)
        self.unknown_by_split.setdefault(split, Counter()).update(counts)
        if self.on_update is not None:
            self.on_update(split)

    def warn_unknown(self, split: str) -> None:
        """Logs a split's ``<unk>`` counts once, at the end of the first pass that met any."""
        unknown = self.unknown_by_split.get(split)
        if not unknown or split in self._warned_unknown:
            return
        self._warned_unknown.add(split)
        log.warning(
            "%s: %d token(s) in %d of %d kept samples are <unk>: the word-level tokenizer lacks their "
            "words (model=tiny builds it from the shards of data=...: is the model run on other data?)",
            split, unknown["tokens"], unknown["samples"], self.kept[split],
        )  # fmt: skip

    def fraction(self, split: str) -> float:
        """Skipped / read samples of ``split`` so far (0 before any sample)."""
        total = self.kept[split] + self.dropped[split]
        return self.dropped[split] / total if total else 0.0

    def check(self, split: str, final: bool) -> None:
        """Raises :class:`SkipLimitError` when the split's skipped fraction is above the limit."""
        total = self.kept[split] + self.dropped[split]
        if (final or total >= self.min_samples) and self.fraction(split) > self.max_fraction:
            raise SkipLimitError(
                f"{self.dropped[split]} of {total} {split} samples were skipped "
                f"({self.fraction(split):.1%} > data.max_skip_fraction={self.max_fraction}); reasons: "
                f"{dict(self.by_split[split])}. Fix the data (re-convert, check images) or raise "
                "data.max_skip_fraction if this loss is acceptable"
            )

    def summary(self) -> dict[str, dict[str, int | dict[str, int]]]:
        """Per split: kept, skipped, the skip reasons and the ``<unk>`` counts (this process only)."""
        return {
            split: {
                "kept": self.kept[split],
                "skipped": self.dropped[split],
                "reasons": dict(self.by_split.get(split, {})),
                "unknown_tokens": self.unknown_by_split.get(split, Counter())["tokens"],
                "unknown_samples": self.unknown_by_split.get(split, Counter())["samples"],
            }
            for split in sorted(set(self.kept) | set(self.by_split) | set(self.unknown_by_split))
        }
