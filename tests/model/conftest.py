"""Tiny random LLaVA-NeXT and hand-built batches (no tokenizer or data set needed); see ``tiny_batches``."""

import pytest
import tiny_batches
from tiny_batches import LENGTHS, SIZES, make_batch

# The shared fixtures, registered again here: this folder gets its own session ``llava``.
llava = tiny_batches.llava
image_processor = tiny_batches.image_processor
routed_core = tiny_batches.routed_core


@pytest.fixture
def batch(image_processor):
    return make_batch(image_processor, SIZES, LENGTHS)
