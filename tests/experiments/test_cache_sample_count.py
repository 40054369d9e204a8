"""stage=rglf_cached asks for more samples than the split has: the error names the key, the count and the fix.

Converted shards carry a manifest with their sample counts, so a request beyond them fails before
any sample is scored; samples skipped while reading (here: answers cut by ``max_length``) can
only show after scoring, and that error names the key too.
"""

import json

import pytest
import torch
from modality_batches import (
    LEVELS,
    build_llava,
    build_tokenizer,
    image_of,
    image_record,
    text_record,
)
from omegaconf import OmegaConf

from avglab.avg.router import GranularityRouter
from avglab.core.model import AvgCore
from avglab.data.convert import convert
from avglab.data.datamodule import ShardDataModule
from avglab.data.processor import build_image_processor
from avglab.data.shardset import read_manifests
from avglab.stages.rglf_cached import CachedRglfStage

STAGE = {
    "name": "rglf",
    "train": ["router"],
    "alpha": 0.1,
    "tie_eps": 0.0,
    "rank_weight": 1.0,
    "token_cost": 0.0,
    "token_cost_scale": "linear",
    "lr": 1e-3,
    "lr_vision": None,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "cache_val_samples": 0,
    "cache_batch_size": 2,
    "cache_dir": None,
    "batch_size": 2,
}
LONG = "what color is the background? " * 12  # its answer falls past max_length: skipped when read
MAX_LENGTH = 64


def records() -> list[dict]:
    """5 records: 3 image questions, 1 text-only, 1 image question too long to keep its answer."""
    out = [image_record(0), text_record(1), image_record(2), image_record(3)]
    long = image_record(4)
    long["conversations"][0]["value"] = f"<image>\n{LONG}"
    return [*out, long]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[str]:
    """The records converted into 2-sample train shards with their manifest."""
    src = tmp_path_factory.mktemp("source")
    (src / "imgs").mkdir()
    recs = records()
    for i, record in enumerate(recs):
        if "text" not in record["question_type"]:
            record["image"] = f"imgs/{i}.png"
            image_of(i).save(src / record["image"])
    (src / "data.json").write_text(json.dumps(recs))
    out = tmp_path_factory.mktemp("shards")
    convert(src / "data.json", out, images=src, samples_per_shard=2, workers=1, progress=False)
    return sorted(str(p) for p in out.glob("train-*.tar"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("words"))


def setup(tokenizer, shards, tmp_path, samples: int):
    """The cached stage over a tiny core, the shard datamodule and the run config."""
    llava = build_llava(tokenizer)
    torch.manual_seed(0)
    core = AvgCore(llava, LEVELS, GranularityRouter(128, LEVELS, k=3, num_heads=4))
    stage = CachedRglfStage(core, OmegaConf.create({**STAGE, "cache_train_samples": samples}))
    side = llava.config.vision_config.image_size
    datamodule = ShardDataModule(
        {"train": shards},
        tokenizer,
        build_image_processor(side, llava.config.image_grid_pinpoints),
        batch_size=2,
        max_length=MAX_LENGTH,
        max_skip_fraction=1.0,
        shard_sizes=read_manifests(shards),
    )
    cfg = OmegaConf.create({"trainer": {"devices": 1, "num_nodes": 1}, "workspace": str(tmp_path), "seed": 0})
    return stage, datamodule, cfg


def test_manifests_fail_the_request_before_any_scoring(tokenizer, shards, tmp_path, monkeypatch):
    stage, datamodule, cfg = setup(tokenizer, shards, tmp_path, samples=6)
    assert datamodule.split_size("train") == 5

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored samples although the manifests already say there are too few")

    monkeypatch.setattr(AvgCore, "all_levels", no_scoring)
    monkeypatch.setattr(AvgCore, "project", no_scoring)
    expected = r"stage.cache_train_samples=6.* only 5 samples.*lower stage.cache_train_samples"
    with pytest.raises(ValueError, match=expected):
        stage.fit_datamodule(cfg, datamodule, None)


def test_samples_skipped_while_reading_fail_after_scoring_naming_the_key(tokenizer, shards, tmp_path):
    stage, datamodule, cfg = setup(tokenizer, shards, tmp_path, samples=5)  # manifests: 5, readable: 4
    with pytest.raises(ValueError, match=r"stage.cache_train_samples=5.* only 4 usable .*truncated_answer"):
        stage.fit_datamodule(cfg, datamodule, None)
    stage, datamodule, cfg = setup(tokenizer, shards, tmp_path, samples=4)
    cached = stage.fit_datamodule(cfg, datamodule, None)
    assert len(cached.train) == 4 and cached.train.meta["text_only"] == 1
    assert cached.skipped == {"truncated_answer": 1}
