"""The benchmark's inputs: synth questions on one fixed-size image each, in batches."""

from __future__ import annotations

import io

from PIL import Image

from avglab.data.collate import collate
from avglab.data.processor import SampleProcessor
from avglab.data.synth.generator import make_sample
from avglab.training.build import synth_config


def largest_pinpoint(pinpoints: list[list[int]]) -> tuple[int, int]:
    """(height, width) of the AnyRes resolution with the most pixels (the most visual tokens)."""
    return tuple(max(pinpoints, key=lambda p: (p[0] * p[1], p[0])))


def bench_inputs(
    cfg, tokenizer, image_processor, pinpoints: list[list[int]], batch_size: int = 1, mixed: bool = False
) -> list[dict]:
    """``stage.inputs`` collate batches of ``batch_size`` samples (synth test questions, image resized).

    Batch i holds test questions i*batch_size ... (i+1)*batch_size - 1: different questions (so
    different prompt lengths, which left padding evens out) on images of the same size.

    Args:
        cfg: the composed config (``data`` must be synth: its questions and template are used).
        tokenizer: the run's tokenizer.
        image_processor: the run's AnyRes image processor.
        pinpoints: the model's AnyRes resolutions, for the default image size.
        batch_size: samples per batch.
        mixed: the images of a batch take the AnyRes resolutions in turn (different sizes and tile
            counts in one batch, ``stage.batch_mixed``) instead of ``stage.image_size``.

    Returns:
        Batches in the collate contract.
    """
    if cfg.data.kind != "synth":
        raise ValueError(f"stage=bench takes its questions from data=synth, got data={cfg.data.name}")
    size = cfg.stage.image_size
    height, width = tuple(size) if size is not None else largest_pinpoint(pinpoints)
    if height < 1 or width < 1:
        raise ValueError(f"stage.image_size={list(size)}: give [height, width] in pixels")
    processor = SampleProcessor(tokenizer, image_processor, cfg.data.template, cfg.data.max_length)
    synth = synth_config(cfg.data)
    batches = []
    for first in range(0, cfg.stage.inputs * batch_size, batch_size):
        samples = []
        for index in range(first, first + batch_size):
            sample = make_sample(synth, "test", index)
            if mixed:  # sample i of the set: resolution i of the model's list (mixed sizes)
                height, width = pinpoints[index % len(pinpoints)]
            image = Image.open(io.BytesIO(sample["png"])).convert("RGB").resize((width, height))
            samples.append(processor(sample["json"], image))
        batches.append(collate(samples, tokenizer.pad_token_id))
    return batches
