"""Shared fixtures of the data tests: a tiny synth config, its shards, tokenizer and image processor."""

from __future__ import annotations

import pytest
from data_llava_helpers import llava_records, write_llava_source

from avglab.data.convert import convert
from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.synth.config import SynthConfig
from avglab.data.synth.generator import ensure_synth_shards, synth_vocabulary
from avglab.data.tokenizer import build_word_tokenizer

PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]


@pytest.fixture(scope="session")
def synth_cfg() -> SynthConfig:
    return SynthConfig(seed=3, n_train=24, n_val=8, n_test=10, samples_per_shard=4)


@pytest.fixture(scope="session")
def synth_urls(synth_cfg, tmp_path_factory) -> dict[str, list[str]]:
    return ensure_synth_shards(synth_cfg, tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="session")
def tokenizer_dir(synth_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    build_word_tokenizer(synth_vocabulary(synth_cfg), folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def image_processor():
    return build_image_processor(64, PINPOINTS)


@pytest.fixture()
def processor(tokenizer, image_processor) -> SampleProcessor:
    return SampleProcessor(tokenizer, image_processor, "vicuna_v1", max_length=128)


@pytest.fixture(scope="session")
def llava_shards(tmp_path_factory):
    """24 records converted into 3-sample shards: (folder, manifest)."""
    src = tmp_path_factory.mktemp("llava_src")
    path = write_llava_source(src, llava_records(24))
    out = tmp_path_factory.mktemp("llava_out")
    manifest = convert(path, out, images=src, samples_per_shard=3, workers=2, progress=False)
    return out, manifest
