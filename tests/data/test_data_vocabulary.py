"""model=tiny's tokenizer comes from the data it reads; words it lacks are counted, never silent."""

import hashlib
import io
import json
import logging
import shutil
from types import SimpleNamespace

import pytest
import webdataset as wds
from data_llava_helpers import LLAVA_IMAGE_SIZES
from PIL import Image
from stage_config import compose_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from avglab.data.convert import convert
from avglab.data.datamodule import ShardDataModule
from avglab.data.processor import SampleProcessor
from avglab.data.synth.generator import synth_vocabulary
from avglab.data.tokenizer import build_word_tokenizer
from avglab.data.vocabulary import record_texts, shard_digest, text_words
from avglab.training.build import build_core, build_datamodule, build_tokenizer, synth_config

EVAL_RECORDS = [  # words only the eval split has: "zebra" in a question, "okapi" in a non-majority answer
    {"question_id": 1, "image": "e0.png", "question": "Is this a zebra?", "answers": ["yes", "yes", "okapi"]},
    {"question_id": 2, "image": "e1.png", "question": "What animal?", "answers": ["giraffe"]},
]


def write_eval_split(out, tmp_path, records=EVAL_RECORDS, overwrite=False) -> dict:
    src = tmp_path / "eval_src"
    src.mkdir(exist_ok=True)
    for i, (h, w) in enumerate(LLAVA_IMAGE_SIZES[:2]):
        Image.new("RGB", (w, h), (40, 90, 200)).save(src / f"e{i}.png")
    path = src / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return convert(
        path, out, images=src, split="test", kind="eval", workers=1, progress=False, overwrite=overwrite
    )


def tiny_on_shards(workspace, root, *overrides):
    return compose_config(
        "model=tiny",
        "data=llava_instruct",
        f"workspace={workspace}",
        f"data.root={root}",
        "data.test_shards=test-*.tar",
        "data.num_workers=0",
        "data.batch_size=4",
        *overrides,
    )


def test_tiny_tokenizer_is_built_from_every_split_of_converted_shards(
    llava_shards, tmp_path, image_processor, caplog, monkeypatch
):
    root = tmp_path / "llava"
    shutil.copytree(llava_shards[0], root)
    write_eval_split(root, tmp_path)
    cfg = tiny_on_shards(tmp_path / "ws", root)
    with caplog.at_level(logging.INFO, logger="avglab.data.vocabulary"):
        tokenizer = build_tokenizer(cfg)
    assert f"tiny tokenizer: {len(tokenizer) - 5} words from 26 samples of {root}" in caplog.messages
    urls = {
        "train": sorted(map(str, root.glob("train-*.tar"))),
        "test": sorted(map(str, root.glob("test-*.tar"))),
    }
    assert tokenizer.name_or_path == str(tmp_path / "ws" / "tokenizers" / shard_digest(urls, "vicuna_v1"))
    vocab = tokenizer.get_vocab()
    assert {"zebra", "okapi", "giraffe", "circle", "assistant", "curious", ":"} <= set(vocab)
    dm = build_datamodule(cfg, tokenizer, image_processor)
    assert len(list(dm.train_dataloader())) == 6 and len(list(dm.test_dataloader())) == 1
    assert dm.unknown == {"tokens": 0, "samples": 0} and not dm.skipped

    def no_reading(*args):
        raise AssertionError("the cached tokenizer must be reused")

    monkeypatch.setattr("avglab.training.build.shard_vocabulary", no_reading)
    assert build_tokenizer(cfg).get_vocab() == vocab  # a second run reads nothing


def test_a_changed_data_set_gets_a_new_tokenizer(llava_shards, tmp_path):
    root = tmp_path / "llava"
    shutil.copytree(llava_shards[0], root)
    write_eval_split(root, tmp_path)
    cfg = tiny_on_shards(tmp_path / "ws", root)
    first = build_tokenizer(cfg)
    changed = [{**EVAL_RECORDS[0], "answers": ["quagga"]}, EVAL_RECORDS[1]]
    write_eval_split(root, tmp_path, changed, overwrite=True)
    second = build_tokenizer(cfg)
    assert second.name_or_path != first.name_or_path
    assert "quagga" in second.get_vocab() and "quagga" not in first.get_vocab()
    llama = build_tokenizer(tiny_on_shards(tmp_path / "ws", root, "data.template=llama_3"))
    assert llama.name_or_path not in (first.name_or_path, second.name_or_path)  # template strings differ
    assert "eot_id" in llama.get_vocab()


def test_synth_tokenizer_is_the_demo_one(tmp_path):
    cfg = compose_config("model=tiny", "data=synth", f"workspace={tmp_path}")
    words = synth_vocabulary(synth_config(cfg.data))
    digest = hashlib.sha256(json.dumps(sorted(words)).encode()).hexdigest()[:12]
    assert digest == "3a1d0b7afd09"  # the demo's tokenizer folder: its ids decide the demo's results
    tokenizer = build_tokenizer(cfg)
    assert tokenizer.name_or_path == str(tmp_path / "tokenizers" / digest)
    assert tokenizer.get_vocab() == build_word_tokenizer(words, tmp_path / "direct").get_vocab()  # same ids
    assert not (tmp_path / "data").exists()  # the synth vocabulary needs no shards


def test_record_texts_take_turns_and_answers_only():
    record = {
        "id": "x",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat?"},
            {"from": "gpt", "value": "Red"},
            "bad",
        ],
        "answers": ["red", 3, "Crimson"],
        "question_type": "colour_kind",
    }
    assert list(record_texts(record)) == ["<image>\nWhat?", "Red", "red", "Crimson"]
    assert list(record_texts(["not", "a", "record"])) == []
    assert text_words(record_texts(record)) == {"what", "?", "red", "crimson"}  # <image> is a special token
    assert text_words(["caf\udce9 ok"]) == set()  # not UTF-8: the loader skips such samples


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def sample(key, question, answer="red") -> dict:
    convo = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"__key__": key, "png": png(), "json": json.dumps({"id": key, "conversations": convo}).encode()}


@pytest.mark.parametrize("workers", [0, 1])
def test_unknown_words_are_counted_logged_and_reported(tmp_path, tokenizer, image_processor, caplog, workers):
    shard = str(tmp_path / "val-00000.tar")
    with wds.TarWriter(shard) as sink:
        sink.write(sample("known", "what color is the background?"))
        sink.write(sample("unknown", "what color is the zebra okapi?", answer="giraffe"))
        sink.write(sample("known2", "what shape is the big object?", answer="circle"))
    dm = ShardDataModule({"val": [shard]}, tokenizer, image_processor, eval_batch_size=2, num_workers=workers)
    logged = []
    dm.trainer = SimpleNamespace(
        logger=SimpleNamespace(log_metrics=lambda m, step: logged.append(m)),
        global_step=3,
        global_rank=0,
        world_size=1,
    )
    with caplog.at_level(logging.WARNING, logger="avglab.data.skips"):
        for _ in range(2):  # two validation passes: the counts add up, the warning comes once
            assert [i for b in dm.val_dataloader() for i in b["ids"]] == ["known", "unknown", "known2"]
    assert dm.unknown == {"tokens": 6, "samples": 2} and not dm.skipped
    assert dm.budget.summary()["val"] | {"reasons": None} == {
        "kept": 6,
        "skipped": 0,
        "reasons": None,
        "unknown_tokens": 6,
        "unknown_samples": 2,
    }
    warned = [m for m in caplog.messages if "<unk>" in m]
    assert warned == [
        "val: 3 token(s) in 1 of 3 kept samples are <unk>: the word-level tokenizer lacks their words "
        "(model=tiny builds it from the shards of data=...: is the model run on other data?)"
    ]
    assert logged[-1]["data/val_unknown_tokens"] == 6.0 and logged[-1]["data/val_unknown_samples"] == 2.0


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: like real checkpoints' (byte fallback), it can spell any text."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<unk>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(["what color is it? red"], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )


def test_byte_fallback_tokenizers_count_no_unknown(image_processor):
    processor = SampleProcessor(byte_level_tokenizer(), image_processor)
    convo = [
        {"from": "human", "value": "<image>\nwhat is a zebra okapi?"},
        {"from": "gpt", "value": "giraffe"},
    ]
    assert processor({"id": "z", "conversations": convo}, Image.new("RGB", (64, 64))) is not None
    assert processor.unknown == {}


def test_build_core_takes_the_tokenizer_a_tiny_model_was_trained_with(tmp_path, tokenizer):
    cfg = tiny_on_shards(tmp_path / "ws", tmp_path / "not_converted")  # building its own would fail
    built, _, core = build_core(cfg, tokenizer=tokenizer)
    assert built is tokenizer and core.llava.get_input_embeddings().num_embeddings == len(tokenizer)
