"""One split as numbered tar shards with a manifest; written resumably, read back for sample counts.

Layout of an output folder (several splits may share it)::

    <split>-00000.tar ...       samples: __key__ (input index), .json (LLaVA record), .jpg/.png/.webp
    <split>.progress.jsonl      a header line, then one line per finished shard (resume state)
    <split>.manifest.json       written when the split is complete

Shard k holds the accepted records of input range [start_k, end_k), so its contents depend only
on the input and the options. A shard is written as ``.tar.partial``, renamed when complete and
only then recorded in the progress file; a re-run keeps every recorded shard and continues after
the last one's range.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds

from avglab.data.jsonstream import file_sha256

FORMAT = "avglab-shards/1"
MAX_LISTED_SKIPS = 100_000  # the manifest lists skipped records up to this many (counts are complete)


@dataclass
class Skip:
    """A record that was not written, and why."""

    index: int
    id: str
    reason: str
    detail: str


@dataclass
class ShardInfo:
    """A finished shard: file, sample count, size, checksum and the input range it covers."""

    name: str
    samples: int
    bytes: int
    sha256: str
    start: int
    end: int
    skipped: list[Skip] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict) -> ShardInfo:
        """Reads a progress-file line."""
        skipped = [Skip(**s) for s in data.pop("skipped", [])]
        return cls(**data, skipped=skipped)


class ShardSetWriter:
    """Writes one split's samples, in input order, into shards of bounded count and size.

    Args:
        out_dir: output folder (created).
        split: split name; shards are ``<split>-%05d.tar``.
        header: what the shards are a function of (source checksum, options); a resumed run must
            match it.
        max_samples: samples per shard.
        max_bytes: a shard is closed once its files hold at least this many bytes.
        overwrite: delete this split's earlier output instead of resuming it.

    Raises:
        ValueError: when ``out_dir`` holds this split converted from another source or with
            other options (and ``overwrite`` is off).
    """

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        header: dict,
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        overwrite: bool = False,
    ):
        if max_samples < 1 or max_bytes < 1:
            raise ValueError(f"shard limits must be >= 1, got {max_samples} samples and {max_bytes} bytes")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.split, self.header = split, header
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.progress = self.out / f"{split}.progress.jsonl"
        self.manifest = self.out / f"{split}.manifest.json"
        if overwrite:
            self._remove_outputs()
        self.done = self._resume()
        self._done_samples = sum(s.samples for s in self.done)  # running totals: read once per record
        self._done_skips = sum(len(s.skipped) for s in self.done)
        self.resume_from = self.done[-1].end if self.done else 0
        self._clean_stale()
        self._sink: wds.TarWriter | None = None
        self._samples = self._bytes = 0
        self._skips: list[Skip] = []
        self._next_index = self.resume_from
        self._records = 0

    @property
    def samples(self) -> int:
        """Samples written so far (finished shards and the open one)."""
        return self._done_samples + self._samples

    @property
    def skipped(self) -> int:
        """Records skipped so far."""
        return self._done_skips + len(self._skips)

    def all_skips(self) -> list[Skip]:
        """Every skipped record so far, in input order."""
        return [s for shard in self.done for s in shard.skipped] + self._skips

    def write(self, index: int, sample: dict) -> None:
        """Writes input record ``index`` as ``sample`` (``__key__`` and encoded fields)."""
        self._advance(index)
        if self._sink is None:
            self._sink = wds.TarWriter(str(self._path(len(self.done), partial=True)), mtime=0.0)
        self._bytes += self._sink.write(sample)
        self._samples += 1
        if self._samples >= self.max_samples or self._bytes >= self.max_bytes:
            self._finish_shard(index + 1)

    def skip(self, skip: Skip) -> None:
        """Records that input record ``skip.index`` was not written."""
        self._advance(skip.index)
        self._skips.append(skip)

    def finish(self, records: int) -> None:
        """Closes the last shard, which ends at ``records`` (the number of input records)."""
        if self._sink is not None:
            self._finish_shard(records)
        self._records = records

    def write_manifest(self, extra: dict | None = None) -> dict:
        """Writes ``<split>.manifest.json`` after :meth:`finish`; returns it.

        Args:
            extra: more manifest fields.
        """
        records = self._records
        skips = self.all_skips()
        manifest = {
            "format": FORMAT,
            "split": self.split,
            **self.header,
            **(extra or {}),
            "records": records,
            "samples": self.samples,
            "skipped_total": len(skips),
            "skipped_by_reason": dict(Counter(s.reason for s in skips).most_common()),
            "skipped": [asdict(s) for s in skips[:MAX_LISTED_SKIPS]],
            "shards": [{k: v for k, v in asdict(s).items() if k != "skipped"} for s in self.done],
        }
        _atomic_write(self.manifest, json.dumps(manifest, indent=1, ensure_ascii=False))
        return manifest

    def _advance(self, index: int) -> None:
        if index < self._next_index:
            raise ValueError(f"records must come in input order: got {index} after {self._next_index - 1}")
        self._next_index = index + 1

    def _path(self, number: int, partial: bool = False) -> Path:
        return self.out / f"{self.split}-{number:05d}.tar{'.partial' if partial else ''}"

    def _finish_shard(self, end: int) -> None:
        """Closes the open shard, renames it into place and records it in the progress file."""
        self._sink.close()
        self._sink = None
        partial, final = self._path(len(self.done), partial=True), self._path(len(self.done))
        start = self.done[-1].end if self.done else 0
        info = ShardInfo(
            final.name, self._samples, partial.stat().st_size, file_sha256(partial), start, end, self._skips
        )
        os.replace(partial, final)
        with open(self.progress, "a", encoding="utf-8") as f:
            if not self.done:
                f.seek(0)
                f.truncate()
                f.write(json.dumps({"header": self.header}) + "\n")
            f.write(json.dumps(asdict(info), ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.append(info)
        self._done_samples += info.samples
        self._done_skips += len(info.skipped)
        self._samples, self._bytes, self._skips = 0, 0, []

    def _resume(self) -> list[ShardInfo]:
        """Finished shards of an earlier run of the same conversion (their files must be intact)."""
        if not self.progress.exists():
            return []
        lines = self.progress.read_text(encoding="utf-8").splitlines()
        header = json.loads(lines[0])["header"] if lines else None
        if header != self.header:
            old = header or {}
            diff = {k: (old.get(k), v) for k, v in self.header.items() if old.get(k) != v}
            raise ValueError(
                f"{self.out} holds split {self.split!r} converted from another source or with other options "
                f"(was -> now: {diff}); pass --overwrite to convert again, or choose another --out"
            )
        done = []
        for line in lines[1:]:
            try:
                info = ShardInfo.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError):
                break  # a line cut by the interruption: that shard is redone
            path = self.out / info.name
            if not path.is_file() or path.stat().st_size != info.bytes:
                break
            done.append(info)
        if len(done) < len(lines) - 1:  # drop the lines after a broken one, so appends stay readable
            kept = [{"header": header}] + [asdict(info) for info in done]
            _atomic_write(self.progress, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in kept))
        return done

    def _clean_stale(self) -> None:
        """Deletes partial shards and shards past the resume point (an interrupted run's leftovers)."""
        for path in self.out.glob(f"{self.split}-*.tar*"):
            number = path.name[len(self.split) + 1 :].split(".")[0]
            if path.name.endswith(".partial") or not number.isdigit() or int(number) >= len(self.done):
                path.unlink()
        self.manifest.unlink(missing_ok=True)

    def _remove_outputs(self) -> None:
        for path in self.out.glob(f"{self.split}-*.tar*"):
            path.unlink()
        self.progress.unlink(missing_ok=True)
        self.manifest.unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")  # ranks may write at once
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describe_shard(path: Path, samples: int, start: int) -> dict:
    """A manifest's entry for a finished shard of ``samples`` samples, the first being number ``start``."""
    return {
        "name": path.name,
        "samples": samples,
        "bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "start": start,
        "end": start + samples,
    }


def write_split_manifest(folder: Path, split: str, shards: list[dict], extra: dict | None = None) -> dict:
    """Writes ``<folder>/<split>.manifest.json`` for shards written by another writer (e.g. the generator).

    Readers count a shard's lost samples exactly from its entry (:func:`read_manifests`).

    Args:
        folder: the shards' folder.
        split: split name.
        shards: one :func:`describe_shard` entry per shard, in order.
        extra: more manifest fields (who wrote the shards).
    """
    manifest = {
        "format": FORMAT,
        "split": split,
        **(extra or {}),
        "samples": sum(s["samples"] for s in shards),
        "shards": shards,
    }
    _atomic_write(Path(folder) / f"{split}.manifest.json", json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def manifest_entries(urls: Iterable[str]) -> dict[str, dict]:
    """The converter manifest's entry of every local shard path that a ``*.manifest.json`` next to it lists.

    Args:
        urls: shard paths.

    Returns:
        ``{url: {"name", "samples", "bytes", "sha256", "start", "end"}}`` for every listed url.
    """
    entries: dict[str, dict] = {}
    folders: dict[Path, dict[str, dict]] = {}
    for url in urls:
        folder = Path(url).parent
        if folder not in folders:
            folders[folder] = {}
            for manifest in folder.glob("*.manifest.json"):
                data = json.loads(manifest.read_text(encoding="utf-8"))
                if data.get("format") == FORMAT:
                    folders[folder].update({s["name"]: s for s in data["shards"]})
        entry = folders[folder].get(Path(url).name)
        if entry is not None:
            entries[url] = entry
    return entries


def read_manifests(urls: Iterable[str]) -> dict[str, int]:
    """Samples per shard for the local shard paths whose folder has a converter manifest.

    Args:
        urls: shard paths.

    Returns:
        ``{url: samples}`` for every url listed in a ``*.manifest.json`` next to it.
    """
    return {url: entry["samples"] for url, entry in manifest_entries(urls).items()}
