"""A tiny random core and hand-built batches for the experiment tests (no tokenizer or data set).

``llava`` and ``image_processor`` are this folder's own session instances (the model tests build theirs).
"""

import pytest
import tiny_batches
from tiny_batches import LENGTHS, SIZES, make_batch

# The shared fixtures, registered again here: this folder gets its own session ``llava``.
llava = tiny_batches.llava
image_processor = tiny_batches.image_processor
routed_core = tiny_batches.routed_core


@pytest.fixture
def batch(image_processor):
    """Four samples, one <image> at position 3, instruction at 4..8, answer after 10, right-padded;
    with ids and question types, without the prompt-only keys."""
    batch = make_batch(image_processor, SIZES, LENGTHS)
    del batch["prompt_input_ids"], batch["prompt_attention_mask"]
    return {
        **batch,
        "ids": [f"s{i}" for i in range(len(SIZES))],
        "question_type": ["glance", "gaze", "glance", "gaze"],
    }
