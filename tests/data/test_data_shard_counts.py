"""Every shard set carries per-shard counts, so a truncated shard's lost samples are counted exactly.

The synth generator writes ``<split>.manifest.json`` as the converter does; a foreign set without one
is said to have unknown counts instead of reporting a number as if it were exact.
"""

import json
import logging
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest

from avglab.data.datamodule import ShardDataModule
from avglab.data.skips import COUNTS_UNKNOWN
from avglab.data.synth.generator import ensure_synth_shards
from avglab.training.build import known_counts

SHARD = "test-00001.tar"  # 4 samples (json + png each)


def copy_set(synth_urls, tmp_path) -> Path:
    folder = Path(synth_urls["test"][0]).parent
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def cut(path: Path, at: int) -> None:
    path.write_bytes(path.read_bytes()[:at])


def read_test_split(folder: Path, tokenizer, image_processor) -> tuple[list[str], dict]:
    urls = {"test": sorted(str(p) for p in folder.glob("test-*.tar"))}
    dm = ShardDataModule(
        urls, tokenizer, image_processor, "vicuna_v1", batch_size=3, eval_batch_size=3, max_length=128,
        max_skip_fraction=1.0, shard_sizes=known_counts(urls),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seen = [i for batch in dm.test_dataloader() for i in batch["ids"]]
    return seen, dict(dm.skipped)


# Shard 1 holds samples 4-7, each a .json then a .png member; cut after two whole samples (no read
# error at all) or inside the second sample's image (a read error, a partial sample).
@pytest.mark.parametrize(("where", "lost"), [("between", 2), ("inside", 3)])
def test_a_truncated_synth_shard_counts_exactly_the_samples_lost(
    synth_urls, synth_cfg, tokenizer, image_processor, tmp_path, where, lost
):
    folder = copy_set(synth_urls, tmp_path)
    members = member_offsets(folder / SHARD)
    at = members[4].offset if where == "between" else members[3].offset_data + 100
    cut(folder / SHARD, at)
    seen, skipped = read_test_split(folder, tokenizer, image_processor)
    assert len(seen) == synth_cfg.n_test - lost
    assert sum(skipped.values()) == lost and skipped.get("truncated_shard", 0) >= lost - 1


def test_a_foreign_set_without_counts_says_counts_unknown(
    synth_urls, tokenizer, image_processor, tmp_path, caplog
):
    folder = copy_set(synth_urls, tmp_path)
    for manifest in folder.glob("*.manifest.json"):
        manifest.unlink()
    cut(folder / SHARD, member_offsets(folder / SHARD)[4].offset)  # between samples: tar reads it silently
    with caplog.at_level(logging.WARNING, logger="avglab"):
        seen, skipped = read_test_split(folder, tokenizer, image_processor)
    assert "counts unknown" in caplog.text and "'test': 3" in caplog.text
    assert skipped == {COUNTS_UNKNOWN: 1}  # one broken shard, its loss not claimed as a sample count
    assert len(seen) == 8


def test_an_older_synth_set_gets_its_counts_added(synth_urls, synth_cfg, tmp_path):
    folder = copy_set(synth_urls, tmp_path)
    written = {p.name: json.loads(p.read_text()) for p in folder.glob("*.manifest.json")}
    assert set(written) == {"train.manifest.json", "val.manifest.json", "test.manifest.json"}
    assert [s["samples"] for s in written["test.manifest.json"]["shards"]] == [4, 4, 2]
    for name in written:
        (folder / name).unlink()  # as a set generated before per-shard counts
    ensure_synth_shards(synth_cfg, tmp_path)
    assert {p.name: json.loads(p.read_text()) for p in folder.glob("*.manifest.json")} == written
