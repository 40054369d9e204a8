"""Reading converted shards: ranks x workers, seeded shuffling, broken shards, skip counts and limits."""

import io
import json
import shutil
import warnings
from types import SimpleNamespace

import pytest
import webdataset as wds
from PIL import Image

from avglab.data.datamodule import ShardDataModule
from avglab.data.shardset import read_manifests
from avglab.data.skips import SkipLimitError

ALL_IDS = {f"rec{i}" for i in range(24)}


def urls_of(folder, split="train") -> list[str]:
    return sorted(str(p) for p in folder.glob(f"{split}-*.tar"))


def make_dm(urls, tokenizer, image_processor, **kwargs) -> ShardDataModule:
    options = {"batch_size": 3, "eval_batch_size": 3, "shuffle_buffer": 6, "max_length": 128, **kwargs}
    return ShardDataModule(urls, tokenizer, image_processor, "vicuna_v1", **options)


def ids_of(loader) -> list[str]:
    return [i for batch in loader for i in batch["ids"]]


def test_two_ranks_two_workers_see_disjoint_samples_that_cover_the_split(
    llava_shards, tokenizer, image_processor
):
    out, _ = llava_shards
    urls = urls_of(out)
    sizes = read_manifests(urls)
    assert sum(sizes.values()) == 24
    evaluated, trained, steps = [], [], []
    for rank in (0, 1):
        dm = make_dm(
            {"train": urls, "test": urls},
            tokenizer,
            image_processor,
            num_workers=2,
            rank=rank,
            world_size=2,
            shard_sizes=sizes,
        )
        evaluated.append(ids_of(dm.test_dataloader()))
        loader = dm.train_dataloader()  # epoch length from the manifest: 24 // (2 ranks * 3)
        batches = list(loader)
        steps.append((len(loader), len(batches)))
        trained.append([i for b in batches for i in b["ids"]])
        assert not dm.skipped
    for seen in (evaluated, trained):
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == ALL_IDS
        assert len(seen[0]) + len(seen[1]) == 24
    assert steps == [(4, 4), (4, 4)]  # the same number of steps on every rank


def test_shuffle_is_seeded_and_changes_every_epoch(llava_shards, tokenizer, image_processor):
    urls = {"train": urls_of(llava_shards[0])}
    first = make_dm(urls, tokenizer, image_processor, seed=5).train_dataloader()
    epoch_1, epoch_2 = ids_of(first), ids_of(first)
    again = ids_of(make_dm(urls, tokenizer, image_processor, seed=5).train_dataloader())
    other = ids_of(make_dm(urls, tokenizer, image_processor, seed=6).train_dataloader())
    assert set(epoch_1) == set(epoch_2) == ALL_IDS
    assert again == epoch_1 and other != epoch_1 and epoch_2 != epoch_1


def broken_copy(folder, tmp_path, cut) -> list[str]:
    """The shards copied, with train-00002.tar cut to ``cut(size)`` bytes."""
    copy = tmp_path / "shards"
    shutil.copytree(folder, copy)
    shard = copy / "train-00002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: cut(len(data))])
    return urls_of(copy)


# train-00002.tar holds 3 samples in 5 tar members of 1024 bytes (header + data): cut inside the
# second sample's image (an error) and exactly after the second sample (no error at all).
@pytest.mark.parametrize("cut", [lambda n: 2048 + 100, lambda n: 3072])
def test_truncated_shard_counts_every_lost_sample(llava_shards, tokenizer, image_processor, tmp_path, cut):
    urls = broken_copy(llava_shards[0], tmp_path, cut)
    dm = make_dm(
        {"test": urls},
        tokenizer,
        image_processor,
        num_workers=2,
        max_skip_fraction=1.0,
        shard_sizes=read_manifests(urls),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn about each skip
        seen = ids_of(dm.test_dataloader())
    assert dm.skipped["truncated_shard"] >= 1  # counted in the workers, reported to the main process
    assert len(seen) + sum(dm.skipped.values()) == 24 and len(seen) < 24
    assert dm.budget.summary()["test"]["kept"] == len(seen)


def test_too_many_skips_stop_the_run(llava_shards, tokenizer, image_processor, tmp_path):
    urls = broken_copy(llava_shards[0], tmp_path, lambda n: 1024)
    dm = make_dm({"test": urls}, tokenizer, image_processor, shard_sizes=read_manifests(urls))
    with (
        pytest.warns(UserWarning),
        pytest.raises(SkipLimitError, match=r"of 24 test samples.*data.max_skip_fraction=0.01"),
    ):
        ids_of(dm.test_dataloader())


def record(key, answer="red", question="<image>\nwhat color is the background?") -> bytes:
    convo = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return json.dumps({"id": key, "conversations": convo}).encode()


def test_bad_records_in_shards_are_counted_and_logged(tmp_path, tokenizer, image_processor):
    buffer = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 0, 0)).save(buffer, format="PNG")
    png = buffer.getvalue()
    samples = [
        {"__key__": "good", "png": png, "json": record("good")},
        {
            "__key__": "latin1",
            "png": png,
            "json": record("latin1", answer="caf\udce9").replace(b"\\udce9", b"\xe9"),
        },
        {"__key__": "empty", "png": png, "json": record("empty", answer=" ")},
        {"__key__": "noconv", "png": png, "json": json.dumps({"id": "noconv"}).encode()},
        {"__key__": "corrupt", "png": png[:40], "json": record("corrupt")},
        {"__key__": "noimage", "json": record("noimage")},
    ]
    with wds.TarWriter(str(tmp_path / "val-00000.tar")) as sink:
        for sample in samples:
            sink.write(sample)
    logged = []
    dm = make_dm(
        {"val": [str(tmp_path / "val-00000.tar")]}, tokenizer, image_processor, max_skip_fraction=1.0
    )
    dm.trainer = SimpleNamespace(
        logger=SimpleNamespace(log_metrics=lambda m, step: logged.append(m)),
        global_step=7,
        global_rank=0,
        world_size=1,
    )
    with pytest.warns(UserWarning, match="skipped a sample"):
        assert ids_of(dm.val_dataloader()) == ["good"]
    assert dm.skipped == {
        "non_utf8_text": 1,
        "empty_answer": 1,
        "no_conversation": 1,
        "undecodable": 1,
        "image_missing": 1,
    }
    assert (
        logged[-1]["data/val_skipped/empty_answer"] == 1.0
        and logged[-1]["data/val_skipped_fraction"] == 5 / 6
    )


def test_no_val_split_turns_validation_off(llava_shards, tokenizer, image_processor):
    dm = make_dm({"train": urls_of(llava_shards[0]), "val": None}, tokenizer, image_processor)
    assert dm.val_dataloader() == []
    with pytest.raises(ValueError, match="no test shards"):
        dm.test_dataloader()
