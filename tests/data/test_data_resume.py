"""The train stream resumes exactly: batches, order and counts after a restart equal the uninterrupted run's.

Lightning's use is emulated without a model: batches are fetched one ahead (as Lightning does for a loader
without a length), each trained batch passes ``on_before_batch_transfer``, and a restart is a new
datamodule that loads the first one's ``state_dict`` (saved and loaded with ``weights_only=True``, as a
checkpoint). The stops fall mid-pass, at a pass end and at an epoch end.
"""

from __future__ import annotations

import io
import logging

import pytest
import torch

from avglab.data.datamodule import ShardDataModule
from avglab.data.resume import Start
from avglab.data.synth.generator import synth_vocabulary
from avglab.data.tokenizer import build_word_tokenizer

TOTAL = 16  # batches of the uninterrupted run


class FakeTrainer:
    """What the datamodule reads of its Trainer."""

    global_rank, world_size, logger, global_step = 0, 1, None, 0


@pytest.fixture(scope="module")
def short_tokenizer(synth_cfg, tmp_path_factory):
    """A word tokenizer without "yellow": kept samples with it have ``<unk>`` tokens to count."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("short_tokenizer")
    build_word_tokenizer([w for w in synth_vocabulary(synth_cfg) if w != "yellow"], folder)
    return AutoTokenizer.from_pretrained(folder)


def make_dm(urls, tokenizer, image_processor, **kwargs) -> ShardDataModule:
    options = {"batch_size": 4, "shuffle_buffer": 8, "max_length": 320, "grid": 8, "max_skip_fraction": 1.0}
    dm = ShardDataModule(
        {"train": urls["train"]}, tokenizer, image_processor, "vicuna_v1", **options, **kwargs
    )
    dm.trainer = FakeTrainer()  # attached: batches carry their position
    return dm


def train(dm: ShardDataModule, batches: int) -> list[list[str]]:
    """The ids of ``batches`` trained batches, epoch after epoch, fetching one batch ahead."""
    trained: list[list[str]] = []
    loader = dm.train_dataloader()
    while len(trained) < batches:
        epoch = iter(loader)
        ahead = next(epoch, None)
        while ahead is not None and len(trained) < batches:
            batch, ahead = ahead, next(epoch, None)
            trained.append(dm.on_before_batch_transfer(batch, 0)["ids"])
    return trained


def checkpointed(dm: ShardDataModule) -> dict:
    """``state_dict`` through a file, loaded as ``run.fit`` loads checkpoints."""
    buffer = io.BytesIO()
    torch.save(dm.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(
    ("workers", "epoch_samples"),  # None: one pass an epoch; 28: 7 batches, more than a pass
    [(0, None), (0, 28), (2, None), pytest.param(2, 28, marks=pytest.mark.slow)],
)
def test_resumed_stream_continues_the_uninterrupted_one(
    synth_urls, short_tokenizer, image_processor, workers, epoch_samples
):
    def dm():
        return make_dm(
            synth_urls, short_tokenizer, image_processor, num_workers=workers, epoch_samples=epoch_samples
        )

    straight = dm()
    expected = train(straight, TOTAL)
    assert straight.skipped["visual_tokens_over_max_length"] > 0 and straight.unknown["tokens"] > 0
    # a pass is 4 batches (5 with 2 workers: the last batch of each is partial), an epoch 7 or a pass
    stops = (2, 4, 7, 9, 14) if workers == 0 else (3, 5, 7, 10)
    for stop in stops:
        first = dm()
        head = train(first, stop)
        second = dm()
        second.load_state_dict(checkpointed(first))
        assert head + train(second, TOTAL - stop) == expected, stop
        assert second.budget.summary() == straight.budget.summary(), stop
        assert second.unknown == straight.unknown and second.skipped == straight.skipped, stop


def test_a_finished_epoch_resumes_with_the_next_pass():
    snapshot = {"pass": 3, "workers": [[12, False], [8, True]], "last": 1, "epoch_batches": 5}
    assert Start.after(snapshot, batches=5) == Start(4)
    assert Start.after(snapshot, batches=6) == Start(3, [[12, False], [8, True]], rotation=0, epoch_batches=5)
    assert Start.after({**snapshot, "last": 0}, batches=None).rotation == 1


def test_a_position_of_other_ranks_or_workers_starts_a_fresh_pass(
    synth_urls, tokenizer, image_processor, caplog
):
    first = make_dm(synth_urls, tokenizer, image_processor)
    train(first, 3)
    state = checkpointed(first)
    other_workers = make_dm(synth_urls, tokenizer, image_processor, num_workers=2)
    with caplog.at_level(logging.WARNING, logger="avglab.data.datamodule"):
        other_workers.load_state_dict(state)
    assert "fresh pass" in caplog.text
    fresh = make_dm(synth_urls, tokenizer, image_processor, num_workers=2)
    fresh.load_state_dict({"train_position": [None]})  # saved before any batch: the stream starts at pass 0
    second_pass = [i for b in other_workers.train_dataloader() for i in b["ids"]]
    first_pass = [i for b in fresh.train_dataloader() for i in b["ids"]]
    assert sorted(second_pass) == sorted(first_pass) and second_pass != first_pass


def test_positions_stay_off_batches_outside_a_trainer(synth_urls, tokenizer, image_processor):
    dm = make_dm(synth_urls, tokenizer, image_processor)
    dm.trainer = None
    assert all("__position__" not in batch for batch in dm.train_dataloader())
