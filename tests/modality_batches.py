"""Image, text-only and mixed micro-batches built through the real processor and collate.

The LLaVA instruction mix holds text-only records (e.g. ShareGPT), so a micro-batch may have images
in some samples, or in none. These helpers build such batches from LLaVA-format records with a word
tokenizer, ``SampleProcessor`` and ``collate`` (the data path of every stage), for a tiny random
LLaVA-NeXT whose vocabulary is the tokenizer's (importable: ``from modality_batches import ...``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from avglab.core.builders import tiny_llava
from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.templates import get_template
from avglab.data.tokenizer import build_word_tokenizer

LEVELS = [4, 8, 16, 32, 64]  # a 64-pixel tile of 8-pixel patches: an 8x8 grid
IMAGE_SIZES = [(64, 128), (128, 128), (128, 64), (64, 64)]  # (height, width): 3, 5, 3 and 1 tiles
QUESTIONS = ["what color is the background?", "what shape is the big object?"]
TEXT_QUESTIONS = ["what is the opposite of black?", "name a shape with three sides."]
ANSWERS = ["red", "green circle", "white", "a triangle"]


def image_record(i: int) -> dict:
    """An image question (placeholder first, as in LLaVA-Instruct) with a short answer."""
    convo = [
        {"from": "human", "value": f"<image>\n{QUESTIONS[i % 2]}"},
        {"from": "gpt", "value": ANSWERS[i % 2]},
    ]
    return {"id": f"img{i}", "conversations": convo, "question_type": "image"}


def text_record(i: int) -> dict:
    """A text-only question (no image, no placeholder)."""
    convo = [
        {"from": "human", "value": TEXT_QUESTIONS[i % 2]},
        {"from": "gpt", "value": ANSWERS[2 + i % 2]},
    ]
    return {"id": f"txt{i}", "conversations": convo, "question_type": "text"}


def vocabulary() -> list[str]:
    """Every text the records and the vicuna_v1 template use."""
    return [*get_template("vicuna_v1").fixed_texts(), *QUESTIONS, *TEXT_QUESTIONS, *ANSWERS]


def build_tokenizer(folder: Path):
    """The word tokenizer of :func:`vocabulary`, saved in ``folder``."""
    return build_word_tokenizer(vocabulary(), folder)


def build_llava(tokenizer, seed: int = 0):
    """A tiny random LLaVA-NeXT over the tokenizer's vocabulary (tile 64, grid 8, 2 LLM layers)."""
    image_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    return tiny_llava(len(tokenizer), image_id, tokenizer.pad_token_id, seed=seed)


def build_processor(tokenizer, llava, max_length: int = 128) -> SampleProcessor:
    """``SampleProcessor`` with LLaVA-NeXT's AnyRes image processor at the model's tile size."""
    side = llava.config.vision_config.image_size
    image_processor = build_image_processor(side, llava.config.image_grid_pinpoints)
    return SampleProcessor(tokenizer, image_processor, "vicuna_v1", max_length=max_length)


def image_of(i: int) -> Image.Image:
    """A flat-coloured image of the i-th size."""
    h, w = IMAGE_SIZES[i % len(IMAGE_SIZES)]
    return Image.new("RGB", (w, h), (40 * (i % 6), 200, 30))


def modality_batch(processor: SampleProcessor, kinds: str) -> dict:
    """A collated micro-batch with one sample per character of ``kinds``: ``i`` image, ``t`` text-only.

    Returns:
        The collate contract (see :func:`avglab.data.collate.collate`).
    """
    samples = []
    for i, kind in enumerate(kinds):
        if kind == "i":
            samples.append(processor(image_record(i), image_of(i)))
        elif kind == "t":
            samples.append(processor(text_record(i), None))
        else:
            raise ValueError(f"kinds: 'i' (image) or 't' (text-only), got {kind!r}")
    return collate(samples, processor.tokenizer.pad_token_id)


def trainable_grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    """Gradient of every trainable parameter by name (None where backward never reached it)."""
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
