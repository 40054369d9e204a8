"""Evaluation readers take the workers a split's shards allow; training keeps one shard per worker."""

import logging

import pytest

from avglab.data.datamodule import ShardDataModule


def make_dm(urls, tokenizer, image_processor, **kwargs) -> ShardDataModule:
    options = {"batch_size": 2, "eval_batch_size": 3, "max_length": 128, "num_workers": 2, **kwargs}
    return ShardDataModule(urls, tokenizer, image_processor, "vicuna_v1", **options)


def test_one_shard_with_two_workers_evaluates_every_sample_once(
    synth_urls, tokenizer, image_processor, caplog
):
    shard = synth_urls["val"][:1]  # 4 samples in one shard, fewer shards than data.num_workers
    dm = make_dm({"val": shard, "test": shard}, tokenizer, image_processor, rank=0, world_size=1)
    expected = [f"synth-val-{i:06d}" for i in range(4)]
    with caplog.at_level(logging.INFO, logger="avglab.data.datamodule"):
        for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.val_dataloader()):
            assert [i for b in loader for i in b["ids"]] == expected
    lowered = [r.getMessage() for r in caplog.records if "instead of data.num_workers=2" in r.getMessage()]
    assert lowered == [  # once per split
        "val: 1 shard(s) on rank 0, so 1 loader worker(s) instead of data.num_workers=2",
        "test: 1 shard(s) on rank 0, so 1 loader worker(s) instead of data.num_workers=2",
    ]
    assert not dm.skipped


def test_eval_workers_follow_the_shards_of_each_rank(synth_urls, tokenizer, image_processor):
    urls = synth_urls["test"]  # 3 shards: rank 0 reads 2, rank 1 reads 1
    seen = []
    for rank, workers in ((0, 2), (1, 1)):
        dm = make_dm({"test": urls}, tokenizer, image_processor, num_workers=4, rank=rank, world_size=2)
        assert dm.workers("test", len(urls), train=False) == workers
        seen += [i for b in dm.test_dataloader() for i in b["ids"]]
    assert sorted(seen) == [f"synth-test-{i:06d}" for i in range(10)]
    assert make_dm({"test": urls}, tokenizer, image_processor, num_workers=0).workers("test", 3, False) == 0


def test_training_needs_a_shard_per_worker(synth_urls, tokenizer, image_processor):
    urls = {"train": synth_urls["train"][:3]}
    dm = make_dm(urls, tokenizer, image_processor, num_workers=2, rank=0, world_size=2, epoch_samples=8)
    with pytest.raises(ValueError, match=r"3 shard\(s\) but 2 rank\(s\) x data.num_workers=2"):
        dm.train_dataloader()
