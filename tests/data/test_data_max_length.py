"""data.max_length counts the whole spliced sequence: text + the visual tokens at the finest level."""

import json

import pytest
import webdataset as wds
from PIL import Image
from stage_config import compose_config

from avglab.data.anyres import count_visual_tokens
from avglab.data.datamodule import ShardDataModule
from avglab.data.processor import RecordError, SampleProcessor, build_image_processor
from avglab.training.build import build_core, build_datamodule, check_max_length

PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]  # model=tiny: 64-px tiles, grid 8
LLAVA_7B_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SMALL_SYNTH = ("data.synth.n_train=4", "data.synth.n_val=0", "data.synth.n_test=0")


def record(answer="red circle", key="r") -> dict:
    convo = [
        {"from": "human", "value": "<image>\nwhat color is the big shape?"},
        {"from": "gpt", "value": answer},
    ]
    return {"id": key, "conversations": convo}


def image(h=64, w=128) -> Image.Image:
    return Image.new("RGB", (w, h), (30, 170, 50))


def test_visual_tokens_are_the_finest_count_of_the_model(tokenizer, image_processor):
    tiny = SampleProcessor(tokenizer, image_processor, grid=8)
    sample = tiny(record(), image())
    expected = count_visual_tokens([64, 128], PINPOINTS, 64, 8)  # global view + 8 rows of 16 + newline
    assert tiny.visual_tokens(sample["image_size"]) == expected == 64 + 8 * (16 + 1)
    real = SampleProcessor(
        tokenizer, build_image_processor(336, LLAVA_7B_PINPOINTS), max_length=4096, grid=24
    )
    big = real(record(), Image.new("RGB", (672, 672)))
    assert real.visual_tokens(big["image_size"]) == 2928  # the 7B model's most per image
    assert SampleProcessor(tokenizer, image_processor).visual_tokens(sample["image_size"]) == 1  # no geometry


def test_text_is_cut_to_max_length_minus_the_visual_tokens(tokenizer, image_processor):
    visual = count_visual_tokens([64, 128], PINPOINTS, 64, 8)
    full = SampleProcessor(tokenizer, image_processor, max_length=4096, grid=8)(record(), image())
    text = len(full["input_ids"])
    max_length = text - 1 + visual - 1  # one token too many once the image is spliced in
    cut = SampleProcessor(tokenizer, image_processor, max_length=max_length, grid=8)(record(), image())
    assert len(cut["input_ids"]) - 1 + visual == max_length  # the spliced sequence fills max_length exactly
    assert (cut["labels"] != -100).sum() == (full["labels"] != -100).sum() - 1
    text_only = {"id": "t", "conversations": record()["conversations"]}
    text_only["conversations"][0] = {"from": "human", "value": "what color is the big shape?"}
    kept = SampleProcessor(tokenizer, image_processor, max_length=text, grid=8)(text_only, None)
    assert len(kept["input_ids"]) == text - 1  # no image: only the (placeholder-less) text counts


def test_an_answer_cut_entirely_is_skipped_and_counted(tokenizer, image_processor):
    visual = count_visual_tokens([64, 128], PINPOINTS, 64, 8)
    full = SampleProcessor(tokenizer, image_processor, max_length=4096, grid=8)(record(), image())
    processor = SampleProcessor(
        tokenizer, image_processor, max_length=full["prompt_len"] - 1 + visual, grid=8
    )
    assert processor(record(), image()) is None
    assert processor.skipped == {"truncated_answer": 1}


def test_visual_tokens_alone_over_max_length_skip_the_sample_naming_the_key(
    tmp_path, tokenizer, image_processor
):
    visual = count_visual_tokens([64, 128], PINPOINTS, 64, 8)
    processor = SampleProcessor(tokenizer, image_processor, max_length=visual - 1, grid=8)
    with pytest.raises(RecordError, match=r"visual_tokens_over_max_length.*data.max_length=199"):
        processor(record(), image())
    shard = str(tmp_path / "val-00000.tar")
    with wds.TarWriter(shard) as sink:
        for key, (h, w) in (("wide", (64, 128)), ("square", (64, 64))):
            buffer = tmp_path / f"{key}.png"
            image(h, w).save(buffer)
            sink.write(
                {"__key__": key, "png": buffer.read_bytes(), "json": json.dumps(record(key=key)).encode()}
            )
    dm = ShardDataModule(
        {"val": [shard]}, tokenizer, image_processor, max_length=visual - 1, grid=8, max_skip_fraction=1.0
    )
    with pytest.warns(UserWarning, match="data.max_length"):
        assert [i for b in dm.val_dataloader() for i in b["ids"]] == ["square"]  # 64 x 64: fewer tokens
    assert dm.skipped == {"visual_tokens_over_max_length": 1}


def test_build_datamodule_gives_the_model_grid(tmp_path, tokenizer, image_processor):
    cfg = compose_config("model=tiny", "data=synth", f"workspace={tmp_path}", *SMALL_SYNTH)
    assert build_datamodule(cfg, tokenizer, image_processor).processor.grid == 8


def test_max_length_over_the_llm_positions_fails_at_config_time(tmp_path):
    cfg = compose_config("model=tiny", f"workspace={tmp_path}", "data.max_length=4097", *SMALL_SYNTH)
    with pytest.raises(
        ValueError, match=r"data.max_length=4097 exceeds the LLM's max_position_embeddings=4096"
    ):
        check_max_length(cfg)
    with pytest.raises(ValueError, match="data.max_length=4097"):
        build_core(cfg)
    assert not (tmp_path / "tokenizers").exists()  # before anything is built
    check_max_length(compose_config("model=tiny", "data.max_length=4096"))
