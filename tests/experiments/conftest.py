"""A tiny random core and hand-built batches for the experiment tests (no tokenizer or data set)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextImageProcessorPil

from avglab.model.builders import tiny_llava
from avglab.model.core import AvgCore
from avglab.model.router import GranularityRouter

VOCAB, IMAGE_ID, PAD_ID = 60, 5, 0
LEVELS = [4, 8, 16, 32, 64]


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
def batch(image_processor):
    """Four samples, one <image> at position 3, instruction at 4..8, answer after 10, right-padded."""
    sizes, lengths = [(128, 128), (64, 128), (96, 128), (128, 64)], [20, 16, 18, 13]
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    pixels = image_processor(images=images, return_tensors="pt")
    ids = torch.randint(10, VOCAB, (len(sizes), max(lengths)), generator=gen)
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
        "pixel_values": pixels["pixel_values"],
        "image_sizes": pixels["image_sizes"],
        "has_image": torch.ones(len(sizes), dtype=torch.bool),
        "ids": [f"s{i}" for i in range(len(sizes))],
        "question_type": ["glance", "gaze", "glance", "gaze"],
    }


@pytest.fixture
def routed_core(llava):
    torch.manual_seed(0)
    router = GranularityRouter(llava.config.text_config.hidden_size, LEVELS, k=3, num_heads=4)
    return AvgCore(llava, LEVELS, router).eval()
