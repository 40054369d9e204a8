import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer, LlavaNextImageProcessorPil

from avglab.data.collate import collate
from avglab.data.processor import RecordError, SampleProcessor
from avglab.data.templates import VICUNA_V1, Turn
from avglab.data.tokenizer import build_word_tokenizer

QUESTION = "what color is the flat bar?"
PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]


def record(question=QUESTION, answer="red", **extra) -> dict:
    convo = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": "r1", "conversations": convo, "question_type": "gaze", **extra}


def image(h=64, w=128) -> Image.Image:
    return Image.new("RGB", (w, h), (30, 170, 50))


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True)


def test_vicuna_pieces_concatenate_to_the_llava_prompt():
    pieces = VICUNA_V1.render([Turn("what?", "red")], "<image>")
    assert "".join(p.text for p in pieces) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions. "
        "USER: <image>\nwhat? ASSISTANT: red</s>"
    )
    assert [p.role.value for p in pieces] == [
        "context",
        "image",
        "context",
        "instruction",
        "context",
        "answer",
    ]


def test_labels_instruction_and_image_token_are_exact(processor, tokenizer):
    sample = processor(record(), image())
    ids, labels, instr = sample["input_ids"], sample["labels"], sample["instruction_mask"]
    supervised = ids[labels != -100]
    assert torch.equal(labels[labels != -100], supervised)
    assert supervised.tolist() == tokenizer.encode("red", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert tokenizer.convert_ids_to_tokens(supervised.tolist()) == ["red", "</s>"]
    assert decode(tokenizer, ids[instr]) == QUESTION
    assert instr.sum() == len(tokenizer.encode(QUESTION, add_special_tokens=False))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (ids == image_id).sum() == 1 and not instr[ids == image_id].any()
    assert ids[0] == tokenizer.bos_token_id
    prompt = tokenizer.convert_ids_to_tokens(ids[: sample["prompt_len"]].tolist())
    assert prompt[-2:] == ["assistant", ":"] and sample["prompt_len"] == (labels == -100).nonzero().max() + 1
    assert sample["question_type"] == "gaze" and sample["answers"] == ["red"] and sample["id"] == "r1"


def test_pixels_equal_a_direct_llava_next_processor_call(processor):
    picture = image(96, 128)
    sample = processor(record(), picture)
    direct = LlavaNextImageProcessorPil(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_grid_pinpoints=PINPOINTS,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )(picture, return_tensors="pt")
    assert sample["pixel_values"].shape == (5, 3, 64, 64)
    assert torch.equal(sample["pixel_values"], direct["pixel_values"][0])
    assert sample["image_size"].tolist() == direct["image_sizes"][0].tolist() == [96, 128]
    assert sample["image_size"].dtype == torch.long and sample["has_image"]


def test_text_only_and_image_without_placeholder(processor, tokenizer):
    convo = [{"from": "human", "value": "what is red?"}, {"from": "gpt", "value": "red"}]
    text = processor({"id": "t", "conversations": convo}, None)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (text["input_ids"] == image_id).sum() == 0 and not text["has_image"]
    assert text["pixel_values"].shape == (0, 3, 64, 64) and text["image_size"].tolist() == [64, 64]
    assert text["question_type"] == "unknown" and text["answers"] == ["red"]
    with_image = processor({"id": "t", "conversations": convo}, image())
    assert (with_image["input_ids"] == image_id).sum() == 1  # LLaVA puts it before the question
    assert decode(tokenizer, with_image["input_ids"][with_image["instruction_mask"]]) == "what is red?"


def test_multi_turn_supervises_every_answer_and_prompts_the_last(processor, tokenizer):
    convo = [
        {"from": "human", "value": "<image>\nwhat color is the background?"},
        {"from": "gpt", "value": "blue"},
        {"from": "human", "value": "what shape is the big object?"},
        {"from": "gpt", "value": "circle"},
    ]
    sample = processor({"id": "m", "conversations": convo}, image())
    ids, labels = sample["input_ids"], sample["labels"]
    assert tokenizer.convert_ids_to_tokens(ids[labels != -100].tolist()) == ["blue", "</s>", "circle", "</s>"]
    assert decode(tokenizer, ids[sample["instruction_mask"]]) == (
        "what color is the background? what shape is the big object?"
    )
    assert tokenizer.convert_ids_to_tokens(ids[sample["prompt_len"] :].tolist()) == ["circle", "</s>"]
    assert sample["answers"] == ["circle"]


def test_prompt_only_record_is_a_generation_prompt(processor, tokenizer):
    convo = [{"from": "human", "value": "<image>\nwhat color is the background?"}]
    sample = processor({"id": "e", "conversations": convo, "answers": ["blue", "navy"]}, image())
    assert (sample["labels"] == -100).all() and sample["prompt_len"] == len(sample["input_ids"])
    assert tokenizer.convert_ids_to_tokens(sample["input_ids"][-2:].tolist()) == ["assistant", ":"]
    assert sample["answers"] == ["blue", "navy"]


def test_malformed_records_raise_with_a_reason(processor):
    with pytest.raises(RecordError, match="image_missing.*add the image"):
        processor(record(), None)
    swapped = {"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(RecordError, match="bad_roles"):
        processor(swapped, None)
    with pytest.raises(RecordError, match="no_conversation"):
        processor({"id": "x", "conversations": ["hello"]}, None)
    with pytest.raises(RecordError, match="several_images"):
        processor(record(question="<image> two"), image())


def test_truncation_without_answer_is_skipped_and_counted(tokenizer, image_processor):
    full = SampleProcessor(tokenizer, image_processor, max_length=512)(record(), image())
    prompt_len = full["prompt_len"]
    cut = SampleProcessor(tokenizer, image_processor, max_length=prompt_len)
    assert cut(record(), image()) is None
    assert cut.skipped == {"truncated_answer": 1}
    one_left = SampleProcessor(tokenizer, image_processor, max_length=prompt_len + 1)(record(), image())
    assert (one_left["labels"] != -100).sum() == 1 and len(one_left["input_ids"]) == prompt_len + 1


def test_collate_pads_to_the_batch_contract(processor, tokenizer):
    long_question = "what color is the big shape? what color is the flat bar?"
    a = processor(record(), image(64, 128))  # 1 + 2 tiles
    b = processor(
        record(question=long_question, answer="blue", answers=["blue", "navy"]), image(128, 128)
    )  # 1 + 4
    c = processor(
        {"id": "t", "conversations": [{"from": "human", "value": "what?"}, {"from": "gpt", "value": "red"}]},
        None,
    )
    batch = collate([a, b, c], pad_token_id=tokenizer.pad_token_id)
    lengths = [len(s["input_ids"]) for s in (a, b, c)]
    prompts = [s["prompt_len"] for s in (a, b, c)]
    B, L, P = 3, max(lengths), max(prompts)
    assert lengths[0] != lengths[1]
    expect = {
        "input_ids": ((B, L), torch.long),
        "attention_mask": ((B, L), torch.long),
        "labels": ((B, L), torch.long),
        "instruction_mask": ((B, L), torch.bool),
        "prompt_input_ids": ((B, P), torch.long),
        "prompt_attention_mask": ((B, P), torch.long),
        "pixel_values": ((B, 5, 3, 64, 64), torch.float32),
        "image_sizes": ((B, 2), torch.long),
        "has_image": ((B,), torch.bool),
    }
    for key, (shape, dtype) in expect.items():
        assert tuple(batch[key].shape) == shape and batch[key].dtype == dtype, key
    for i, (n, p) in enumerate(zip(lengths, prompts, strict=True)):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (L - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all() and (
            batch["labels"][i, n:] == -100
        ).all()
        assert not batch["instruction_mask"][i, n:].any()
        assert torch.equal(batch["prompt_input_ids"][i, :p], batch["input_ids"][i, :p])
        assert batch["prompt_attention_mask"][i].sum() == p
    assert (
        torch.equal(batch["pixel_values"][0, :3], a["pixel_values"])
        and (batch["pixel_values"][0, 3:] == 0).all()
    )
    assert (batch["pixel_values"][2] == 0).all()
    assert batch["image_sizes"].tolist() == [[64, 128], [128, 128], [64, 64]]
    assert batch["has_image"].tolist() == [True, True, False]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [1, 1, 0]
    assert batch["ids"] == ["r1", "r1", "t"] and batch["answers"] == [["red"], ["blue", "navy"], ["red"]]
    assert batch["question_type"] == ["gaze", "gaze", "unknown"]


def test_tokenizer_round_trips_through_save_pretrained(tmp_path):
    built = build_word_tokenizer(["What color is it?", "red", "blue"], tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.convert_ids_to_tokens(list(range(5))) == ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    assert (loaded.pad_token_id, loaded.unk_token_id, loaded.bos_token_id, loaded.eos_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert loaded.image_token == "<image>" and loaded.convert_tokens_to_ids("<image>") == 4
    text = "What color is it? <image> RED</s>"
    assert loaded(text)["input_ids"] == built(text)["input_ids"]
    assert loaded.convert_ids_to_tokens(loaded(text)["input_ids"]) == [
        "<s>",
        "what",
        "color",
        "is",
        "it",
        "?",
        "<image>",
        "red",
        "</s>",
    ]
    assert (
        loaded.decode(loaded.encode("what color is green?", add_special_tokens=False))
        == "what color is <unk>?"
    )
    assert len(loaded) == 5 + len({"what", "color", "is", "it", "?", "red", "blue"})
