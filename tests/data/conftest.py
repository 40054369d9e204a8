"""Shared fixtures of the data tests: a tiny synth config, its shards, tokenizer and image processor."""

from __future__ import annotations

import weakref

import pytest
from data_llava_helpers import llava_records, write_llava_source
from torch.utils.data import dataloader as torch_dataloader

from avglab.data.convert import convert
from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.synth.config import SynthConfig
from avglab.data.synth.generator import ensure_synth_shards, synth_vocabulary
from avglab.data.tokenizer import build_word_tokenizer

PINPOINTS = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]


@pytest.fixture(autouse=True)
def _stop_loader_workers(monkeypatch):
    """Shuts down, at the end of each test, the DataLoader worker processes it started.

    The loaders keep their workers (persistent ones, or an iterator a test leaves mid-pass) until they are
    garbage collected; the datamodule's sit in reference cycles, so that happens during some later test,
    which then waits out torch's 5 s join timeout per worker. An explicit shutdown takes milliseconds.
    """
    started = weakref.WeakSet()
    iterator_class = torch_dataloader._MultiProcessingDataLoaderIter
    init = iterator_class.__init__

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        started.add(self)

    monkeypatch.setattr(iterator_class, "__init__", tracked_init)
    yield
    for iterator in list(started):
        iterator._shutdown_workers()  # a no-op for one already shut down


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
