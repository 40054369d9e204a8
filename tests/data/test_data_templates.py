"""Chat templates: exact LLaVA strings, and labels that supervise exactly the answers and turn ends."""

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from avglab.data.processor import RecordError, SampleProcessor
from avglab.data.templates import LLAMA_3, PLAIN, TEMPLATES, Turn, get_template

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", *LLAMA_SPECIALS]
DIALOGUE = [
    ("What color is the Background?", "It is dark Blue."),
    ("And the shape?", "A circle, I think."),
    ("How many?", "Three (3)!"),
]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (case and spaces kept, like real LLM tokenizers)."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [t for template in TEMPLATES.values() for t in template.fixed_texts()]
    corpus += [text for pair in DIALOGUE for text in pair]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
        clean_up_tokenization_spaces=False,
    )


def conversation(n_turns: int, with_image: bool = True) -> dict:
    convo = []
    for i, (question, answer) in enumerate(DIALOGUE[:n_turns]):
        value = f"<image>\n{question}" if i == 0 and with_image else question
        convo += [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]
    return {"id": "d", "conversations": convo}


def supervised_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of label ids that are not -100."""
    runs, current = [], []
    for label in labels.tolist():
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def test_plain_and_llama_3_render_llava_next_strings():
    plain = PLAIN.render([Turn("Describe the image briefly.", "a red bus")], "<image>")
    assert "".join(p.text for p in plain) == "<image>a red bus\n"  # LLaVA preprocess_plain
    assert [p.role.value for p in plain] == ["image", "answer"]
    llama = LLAMA_3.render([Turn("what?", "red"), Turn("and?", None)], "<image>")
    assert "".join(p.text for p in llama) == (
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. "
        "You are able to understand the visual content that the user provides, and assist the user with "
        "a variety of tasks using natural language.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nwhat?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nred<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nand?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert set(TEMPLATES) == {"vicuna_v1", "plain", "llama_3"}
    with pytest.raises(KeyError, match="llama_3"):
        get_template("llama3")


@pytest.mark.parametrize(("name", "turns"), [("vicuna_v1", 3), ("llama_3", 3), ("plain", 1)])
def test_unmasked_tokens_decode_to_exactly_the_answers(name, turns, bpe_tokenizer, image_processor):
    template = get_template(name)
    processor = SampleProcessor(bpe_tokenizer, image_processor, template, max_length=512)
    sample = processor(conversation(turns), Image.new("RGB", (128, 64), (9, 9, 9)))
    ids, labels = sample["input_ids"], sample["labels"]
    runs = supervised_runs(labels)
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    decoded = [bpe_tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    answers = [answer for _, answer in DIALOGUE[:turns]]
    assert decoded == [template.answer_prefix + a + template.turn_end for a in answers]
    # The whole sequence is the rendered prompt: nothing is lost between pieces.
    pieces = template.render([Turn(q.strip(), a) for q, a in DIALOGUE[:turns]], "<image>")
    full = bpe_tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    assert full == "<s>" + "".join(p.text for p in pieces)
    instruction = bpe_tokenizer.decode(ids[sample["instruction_mask"]].tolist())
    assert instruction == ("" if name == "plain" else "".join(q for q, _ in DIALOGUE[:turns]))


def test_plain_takes_one_captioned_image(bpe_tokenizer, image_processor):
    processor = SampleProcessor(bpe_tokenizer, image_processor, "plain")
    with pytest.raises(RecordError, match="too_many_turns.*vicuna_v1"):
        processor(conversation(2), Image.new("RGB", (64, 64)))
    with pytest.raises(RecordError, match="no_image"):
        processor(conversation(1, with_image=False), None)
