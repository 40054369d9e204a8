"""The feedback cache: exact reuse of frozen-LMM feedback and router inputs; a key that cannot go stale."""

import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import avglab.avg.feedback_cache as fc
import avglab.avg.feedback_store as store
from avglab.avg.router import GranularityRouter
from avglab.core.model import AvgCore
from avglab.stages.rglf import RglfStage
from avglab.stages.rglf_cached import CachedRglfStage

STAGE = {
    "name": "rglf_cached",
    "train": ["router"],
    "alpha": 0.1,
    "tie_eps": 0.0,
    "rank_weight": 1.0,
    "token_cost": 0.002,
    "token_cost_scale": "linear",
    "lr": 1e-3,
    "lr_vision": None,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
    "cache_train_samples": 4,
    "cache_val_samples": 0,
    "cache_batch_size": None,
    "cache_dir": None,
    "batch_size": 4,
}


class FakeTokenizer:
    special_tokens_map = {"pad_token": "<pad>"}

    def get_vocab(self):
        return {"<pad>": 0, "a": 1}


def fake_datamodule(tmp_path, image_processor, content=b"shard"):
    shard = tmp_path / "train-00000.tar"
    shard.write_bytes(content)
    processor = SimpleNamespace(
        tokenizer=FakeTokenizer(),
        image_processor=image_processor,
        template="vicuna_v1",
        max_length=64,
        grid=8,
    )
    return SimpleNamespace(urls={"train": [str(shard)]}, processor=processor)


def test_cached_stage_sees_exactly_what_the_plain_stage_sees(routed_core, batch):
    stage = OmegaConf.create(STAGE)
    plain_logits, plain_feedback, plain_tokens = RglfStage(routed_core, stage).routed(batch)
    tensors, facts = fc.compute_cache(routed_core, iter([batch]), samples=4)
    cache = fc.FeedbackCache(tensors, facts)
    cached = fc.FeedbackCache.collate([cache[i] for i in range(len(cache))])
    logits, feedback, tokens = CachedRglfStage(routed_core, stage).routed(cached)
    assert facts["ids"] == ["s0", "s1", "s2", "s3"]
    assert torch.equal(tokens, plain_tokens)
    assert torch.allclose(feedback, plain_feedback, atol=1e-6)  # token cost applied after the cache
    assert torch.allclose(logits, plain_logits, atol=1e-5)


def test_one_cache_serves_every_k(llava, batch):
    """The instruction filter (depends on k) runs after the cache: any k gets the uncached logits."""
    tensors, facts = fc.compute_cache(AvgCore(llava, fc_levels()), iter([batch]), samples=4)
    cached = fc.FeedbackCache.collate([fc.FeedbackCache(tensors, facts)[i] for i in range(4)])
    for k in (1, 5):
        torch.manual_seed(0)
        core = AvgCore(llava, fc_levels(), GranularityRouter(128, fc_levels(), k=k, num_heads=4)).eval()
        stage = OmegaConf.create(STAGE)
        expected, _, _ = RglfStage(core, stage).routed(batch)
        got, _, _ = CachedRglfStage(core, stage).routed(cached)
        assert torch.allclose(got, expected, atol=1e-5)


def fc_levels():
    return [4, 8, 16, 32, 64]


def test_cache_key_changes_with_weights_data_granularities_and_code(
    routed_core, llava, image_processor, tmp_path, monkeypatch
):
    dm = fake_datamodule(tmp_path, image_processor)
    key = fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8))
    assert key == fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8))  # stable
    weight = llava.model.multi_modal_projector.linear_1.weight
    with torch.no_grad():
        weight[0, 0] += 1e-3  # another checkpoint
    try:
        assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8)) != key
    finally:
        with torch.no_grad():
            weight[0, 0] -= 1e-3
    assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8)) == key
    other_data = fake_datamodule(tmp_path, image_processor, content=b"other shard")
    assert fc.cache_key(fc.cache_spec(routed_core, other_data, "train", 8)) != key
    dm = fake_datamodule(tmp_path, image_processor)
    subset = AvgCore(llava, [4, 16, 64], None)
    assert fc.cache_key(fc.cache_spec(subset, dm, "train", 8)) != key
    assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 16)) != key
    dm.processor.template = "llama_3"
    assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8)) != key
    dm.processor.template = "vicuna_v1"
    dm.processor.grid = 12  # another model geometry: max_length cuts other samples
    assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8)) != key
    dm.processor.grid = 8
    monkeypatch.setattr(fc, "CACHE_VERSION", fc.CACHE_VERSION + 1)  # scoring code changed
    assert fc.cache_key(fc.cache_spec(routed_core, dm, "train", 8)) != key


def test_cache_is_built_once_then_reused_and_a_foreign_spec_is_refused(routed_core, batch, tmp_path):
    calls = []

    def build():
        calls.append(1)
        return fc.compute_cache(routed_core, iter([batch]), samples=4)

    spec = {"version": 1, "what": "test"}
    first, built = store.load_or_build(tmp_path, spec, build)
    again, built_again = store.load_or_build(tmp_path, spec, build)
    assert (built, built_again, len(calls)) == (True, False, 1)
    assert torch.equal(first.feedback, again.feedback) and torch.equal(first.tiles, again.tiles)
    stored = store.cache_folder(tmp_path, spec) / "spec.json"
    stored.write_text(json.dumps({**spec, "what": "edited"}))
    with pytest.raises(ValueError, match="holds another spec"):
        store.load_or_build(tmp_path, spec, build)


def test_too_few_samples_is_an_error_naming_the_key(routed_core, batch):
    with pytest.raises(ValueError, match="stage.cache_"):
        fc.compute_cache(routed_core, iter([batch]), samples=10)


def test_building_a_cache_shows_progress(routed_core, batch, caplog):
    with caplog.at_level("INFO", logger="avglab.avg.feedback_cache"):
        fc.compute_cache(routed_core, iter([batch]), samples=4)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("feedback cache (")]
    assert lines and lines[-1].startswith("feedback cache (stage.cache_train_samples): 4/4 samples (100%)")
    assert "samples/s" in lines[-1] and "ETA" in lines[-1]
