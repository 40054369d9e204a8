"""A tiny random LLaVA-NeXT written as a Hugging Face checkpoint folder.

The folder has what a llava-hf checkpoint has (``config.json``, ``model.safetensors``, tokenizer
and processor files), so ``model=llava_next_vicuna_7b model.path=<folder>`` runs the real
checkpoint code path in seconds, without a download::

    python -m avglab.core.tiny_checkpoint /tmp/tiny-llava-next
    python -m avglab stage=pretrain model=llava_next_vicuna_7b model.path=/tmp/tiny-llava-next \
        model.tile_size=64 model.patch_size=8 model.granularities=[4,8,16,32,64] \
        "model.grid_pinpoints=[[64,128],[128,64],[128,128],[192,64],[64,192]]"
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from transformers import LlavaNextProcessor

from avglab.core.builders import tiny_llava
from avglab.data.processor import build_image_processor
from avglab.data.synth.config import SynthConfig
from avglab.data.synth.generator import synth_vocabulary
from avglab.data.tokenizer import IMAGE, build_word_tokenizer

TINY_OVERRIDES = [
    "model.tile_size=64",
    "model.patch_size=8",
    "model.granularities=[4,8,16,32,64]",
    "model.grid_pinpoints=[[64,128],[128,64],[128,128],[192,64],[64,192]]",
]  # model=llava_next_vicuna_7b overrides that describe the folder written with the defaults below


def write_tiny_checkpoint(
    folder: str | Path, words: Iterable[str] | None = None, seed: int = 0, **sizes
) -> Path:
    """Saves a tiny random LLaVA-NeXT with its tokenizer and processor to ``folder``.

    Args:
        folder: output folder (created).
        words: the tokenizer's vocabulary (default: the generated data set's).
        seed: weight initialisation seed.
        **sizes: :func:`~avglab.core.builders.tiny_llava` size arguments (tile_size, patch_size, ...).

    Returns:
        ``folder``.
    """
    if sizes.get("vision_stem", "patch") != "patch":
        raise ValueError("a Hugging Face checkpoint folder needs CLIP's own patch map: vision_stem='patch'")
    folder = Path(folder)
    words = list(words) if words is not None else synth_vocabulary(SynthConfig())
    tokenizer = build_word_tokenizer(words, folder)
    model = tiny_llava(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,  # the tokenizer's ids, so generate() stops on its </s>
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        **sizes,
    )
    vision = model.config.vision_config
    processor = LlavaNextProcessor(
        image_processor=build_image_processor(vision.image_size, model.config.image_grid_pinpoints),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        image_token=IMAGE,
        num_additional_image_tokens=1,  # CLIP's CLS token
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m avglab.core.tiny_checkpoint OUT``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out, seed=args.seed))


if __name__ == "__main__":
    main()
