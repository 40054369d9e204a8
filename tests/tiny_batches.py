"""A tiny random LLaVA-NeXT and hand-built batches (no tokenizer or data set), for the model and
experiment tests (importable: ``from tiny_batches import ...``; see ``stage_config`` for the path)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil

from avglab.avg.router import GranularityRouter
from avglab.core.builders import tiny_llava
from avglab.core.model import AvgCore

VOCAB, IMAGE_ID, PAD_ID = 60, 5, 0
LEVELS = [4, 8, 16, 32, 64]
SIZES = [(128, 128), (64, 128), (96, 128), (128, 64)]  # several aspect ratios, 2-4 local tiles
LENGTHS = [20, 16, 18, 13]


# Fixtures: tests/model/conftest.py and tests/experiments/conftest.py import them, and pytest
# registers them once per conftest, so each folder gets its own session ``llava``.
@pytest.fixture(scope="session")
def llava():
    return tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0)


@pytest.fixture(scope="session")
def image_processor(llava):
    side = llava.config.vision_config.image_size
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_grid_pinpoints=llava.config.image_grid_pinpoints,
    )


@pytest.fixture
def routed_core(llava):
    torch.manual_seed(0)
    router = GranularityRouter(llava.config.text_config.hidden_size, LEVELS, k=3, num_heads=4)
    return AvgCore(llava, LEVELS, router).eval()


def make_batch(image_processor, sizes, lengths, seed=0):
    """Right-padded batch with one <image> at position 3, instructions at 4..8, answers after 10."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pixels = image_processor(images=images, return_tensors="pt")
    width = max(lengths)
    ids = torch.randint(10, VOCAB, (len(sizes), width), generator=gen)
    ids[:, 3] = IMAGE_ID
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[mask == 0] = PAD_ID
    labels = ids.clone()
    labels[:, :10] = -100
    labels[mask == 0] = -100
    instruction = torch.zeros_like(ids, dtype=torch.bool)
    instruction[:, 4:9] = True
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "instruction_mask": instruction,
        "prompt_input_ids": ids[:, :10],
        "prompt_attention_mask": torch.ones(len(sizes), 10, dtype=torch.long),
        "pixel_values": pixels["pixel_values"],
        "image_sizes": pixels["image_sizes"],
        "has_image": torch.ones(len(sizes), dtype=torch.bool),
    }


def select_rows(batch, rows):
    """Sub-batch of the given rows, re-trimmed to its own longest sample and tile count."""
    out = {k: v[rows] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())
    for key in ("input_ids", "attention_mask", "labels", "instruction_mask"):
        out[key] = out[key][:, :width]
    return out
