"""``model.vision_position_init``: the tiny tower's position table can start from 2D sine-cosine codes."""

import pytest
import torch
from omegaconf import OmegaConf

from avglab.core.position_codes import sincos_2d
from avglab.data.tokenizer import build_word_tokenizer
from avglab.training.build import build_llava


def position_table(tmp_path, **model) -> torch.Tensor:
    tokenizer = build_word_tokenizer(["what shape is it", "circle"], tmp_path)
    model_cfg = OmegaConf.merge(OmegaConf.load("conf/model/tiny.yaml"), model)
    llava = build_llava(OmegaConf.create({"model": model_cfg, "seed": 0}), tokenizer)
    return llava.model.vision_tower.embeddings.position_embedding.weight.detach()


def test_sincos_codes_give_each_place_its_row_and_column():
    codes = sincos_2d(8, 64)  # (64 places, 64 channels): rows in the first half, columns in the second
    rows, cols = codes[:, :32].view(8, 8, 32), codes[:, 32:].view(8, 8, 32)
    assert torch.equal(rows, rows[:, :1].expand_as(rows)) and torch.equal(cols, cols[:1].expand_as(cols))
    assert len({tuple(c.tolist()) for c in codes}) == 64  # every place distinct
    assert codes.abs().max() <= 1.0 and codes.std() > 0.5  # amplitude 1, not CLIP's 0.02


def test_the_tiny_tower_starts_from_the_configured_position_codes(tmp_path):
    clip = position_table(tmp_path)
    sincos = position_table(tmp_path, vision_position_init="sincos")
    assert clip.std() < 0.05  # CLIP's own draw (std 0.02)
    assert torch.equal(sincos[0], torch.zeros_like(sincos[0]))  # CLS
    assert torch.equal(sincos[1:], sincos_2d(8, 64))
    with pytest.raises(ValueError, match="vision_position_init='rope'.*clip, sincos"):
        position_table(tmp_path, vision_position_init="rope")


def test_sincos_needs_a_width_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(8, 62)
