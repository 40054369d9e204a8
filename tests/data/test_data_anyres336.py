"""AnyRes preprocessing equals Hugging Face's LlavaNextImageProcessor with the real 336-px configuration."""

import io
import json

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from transformers import LlavaNextImageProcessor

from avglab.data.processor import SampleProcessor, build_image_processor
from avglab.data.shard_samples import to_model_sample
from avglab.data.tokenizer import build_word_tokenizer

# preprocessor_config.json of llava-hf/llava-v1.6-vicuna-7b-hf (the checkpoint the paper builds on).
REAL_CONFIG = {
    "aspect_ratio_setting": "anyres",
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "LlavaNextImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaNextProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
# (height, width, mode, format): square, 4:3, 3:4, wide and tall panoramas, a thin strip, odd modes.
CASES = [
    (336, 336, "RGB", "PNG"),
    (480, 640, "RGB", "JPEG"),
    (640, 480, "L", "PNG"),
    (200, 900, "RGBA", "PNG"),
    (1000, 250, "RGB", "JPEG"),
    (37, 1500, "P", "PNG"),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llava-next-config")
    (folder / "preprocessor_config.json").write_text(json.dumps(REAL_CONFIG))
    return LlavaNextImageProcessor.from_pretrained(folder)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    tokenizer = build_word_tokenizer(["what", "red"], tmp_path_factory.mktemp("tok"))
    ours = build_image_processor(336, REAL_CONFIG["image_grid_pinpoints"])
    return SampleProcessor(tokenizer, ours)


def encoded(h: int, w: int, mode: str, fmt: str) -> bytes:
    pixels = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(("h", "w", "mode", "fmt"), CASES)
def test_shard_path_matches_llava_next_image_processor(h, w, mode, fmt, reference, processor):
    data = encoded(h, w, mode, fmt)
    ext = "jpg" if fmt == "JPEG" else "png"
    record = {
        "id": "x",
        "conversations": [{"from": "human", "value": "<image>\nwhat"}, {"from": "gpt", "value": "red"}],
    }
    decoded = wds.decode("pil")([{"__key__": "x", ext: data, "json": json.dumps(record).encode()}])
    sample = to_model_sample(next(iter(decoded)), processor)  # what the datamodule does with a shard sample
    # LLaVA opens images with PIL and converts them to RGB before its processor.
    expected = reference(Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
    assert torch.equal(sample["pixel_values"], expected["pixel_values"][0])
    assert sample["image_size"].tolist() == expected["image_sizes"][0].tolist() == [h, w]
    assert sample["pixel_values"].shape[1:] == (3, 336, 336)


def test_builder_has_the_checkpoint_configuration(reference):
    ours = build_image_processor(336, REAL_CONFIG["image_grid_pinpoints"]).to_dict()
    theirs = reference.to_dict()
    ignored = {"aspect_ratio_setting"}  # not read by the processor
    assert {k: v for k, v in ours.items() if k not in ignored} == {
        k: v for k, v in theirs.items() if k not in ignored
    }
