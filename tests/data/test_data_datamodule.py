import io
import json
import warnings

import pytest
import torch
import webdataset as wds
from PIL import Image

from avglab.data.datamodule import ShardDataModule

CONTRACT = {
    "input_ids",
    "attention_mask",
    "labels",
    "instruction_mask",
    "prompt_input_ids",
    "prompt_attention_mask",
    "pixel_values",
    "image_sizes",
    "has_image",
    "ids",
    "question_type",
    "answers",
}


def make_dm(urls, tokenizer, image_processor, **kwargs) -> ShardDataModule:
    options = {"batch_size": 4, "eval_batch_size": 3, "shuffle_buffer": 8, "max_length": 128, **kwargs}
    return ShardDataModule(urls, tokenizer, image_processor, "vicuna_v1", **options)


def test_eval_loader_yields_contract_batches_each_sample_once(synth_urls, tokenizer, image_processor):
    dm = make_dm(synth_urls, tokenizer, image_processor)
    batches = list(dm.test_dataloader())
    assert {len(b["ids"]) for b in batches[:-1]} == {3}
    for batch in batches:
        assert set(batch) == CONTRACT
        B, L = batch["input_ids"].shape
        assert batch["pixel_values"].shape[0] == B and batch["pixel_values"].shape[2:] == (3, 64, 64)
        assert batch["image_sizes"].dtype == torch.long and batch["has_image"].all()
        image_id = tokenizer.convert_tokens_to_ids("<image>")
        assert (batch["input_ids"] == image_id).sum(1).tolist() == [1] * B
        assert set(batch["question_type"]) <= {"glance", "gaze"}
    ids = [i for b in batches for i in b["ids"]]
    assert sorted(ids) == [f"synth-test-{i:06d}" for i in range(10)]
    assert [i for b in dm.test_dataloader() for i in b["ids"]] == ids  # eval order is stable
    assert not dm.skipped


def test_train_epoch_has_fixed_length_and_reshuffles(synth_urls, tokenizer, image_processor):
    dm = make_dm(synth_urls, tokenizer, image_processor, epoch_samples=40)  # more than one pass of 24
    loader = dm.train_dataloader()
    assert len(loader) == 10
    first = [i for b in loader for i in b["ids"]]
    second = [i for b in loader for i in b["ids"]]
    assert len(first) == len(second) == 40 and first != second
    assert set(first) <= {f"synth-train-{i:06d}" for i in range(24)}
    one_pass = [
        i for b in make_dm(synth_urls, tokenizer, image_processor).train_dataloader() for i in b["ids"]
    ]
    assert sorted(one_pass) == sorted(f"synth-train-{i:06d}" for i in range(24))


def test_workers_split_shards_without_duplicates(synth_urls, tokenizer, image_processor):
    dm = make_dm(synth_urls, tokenizer, image_processor, num_workers=2)
    ids = [i for b in dm.val_dataloader() for i in b["ids"]]
    assert sorted(ids) == [f"synth-val-{i:06d}" for i in range(8)]


def write_shard(path, samples) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def png(color=(200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 64), color).save(buffer, format="PNG")
    return buffer.getvalue()


def rec(key, question="<image>\nwhat color is the background?", first="human") -> bytes:
    other = "gpt" if first == "human" else "human"
    convo = [{"from": first, "value": question}, {"from": other, "value": "red"}]
    return json.dumps({"id": key, "conversations": convo, "question_type": "glance"}).encode()


def test_bad_samples_are_counted_by_reason(tmp_path, tokenizer, image_processor):
    shard = write_shard(
        tmp_path / "val-00000.tar",
        [
            {"__key__": "good", "png": png(), "json": rec("good")},
            {"__key__": "text", "json": rec("text", question="what color is the background?")},
            {"__key__": "broken", "png": b"not a png", "json": rec("broken")},
            {"__key__": "noimage", "json": rec("noimage")},
            {"__key__": "roles", "png": png(), "json": rec("roles", first="gpt")},
            {"__key__": "long", "png": png(), "json": rec("long", question="<image>\n" + "what " * 200)},
        ],
    )
    dm = make_dm({"val": [shard]}, tokenizer, image_processor, max_skip_fraction=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(dm.val_dataloader())
    assert [i for b in batches for i in b["ids"]] == ["good", "text"]
    assert batches[0]["has_image"].tolist() == [True, False]
    assert dm.skipped == {"undecodable": 1, "image_missing": 1, "bad_roles": 1, "truncated_answer": 1}
    messages = [str(w.message) for w in caught if "skipped a sample" in str(w.message)]
    assert len(messages) == 3 and any("broken" in m and ".png" in m for m in messages)


def test_missing_or_too_few_shards_fail_early(synth_urls, tokenizer, image_processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        make_dm({"val": [str(tmp_path / "nope.tar")]}, tokenizer, image_processor).val_dataloader()
    with pytest.raises(ValueError, match="no test shards"):
        make_dm({"val": synth_urls["val"]}, tokenizer, image_processor).test_dataloader()
    with pytest.raises(ValueError, match=r"1 shard\(s\) but 1 rank\(s\) x data.num_workers=2"):
        one = make_dm({"train": synth_urls["train"][:1]}, tokenizer, image_processor, num_workers=2)
        one.train_dataloader()
