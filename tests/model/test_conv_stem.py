"""``model.vision_stem=conv``: the tiny tower's patch map as 3x3 stride-2 convolutions (core.conv_stem)."""

import pytest
import torch
from omegaconf import OmegaConf

from avglab.core.conv_stem import ConvStem
from avglab.core.tiny_checkpoint import write_tiny_checkpoint
from avglab.data.tokenizer import build_word_tokenizer
from avglab.training.build import build_llava


def tiny(tmp_path, **model):
    tokenizer = build_word_tokenizer(["what shape is it", "circle"], tmp_path)
    model_cfg = OmegaConf.merge(OmegaConf.load("conf/model/tiny.yaml"), model)
    return build_llava(OmegaConf.create({"model": model_cfg, "seed": 0}), tokenizer)


def patch_tokens(llava, pixels: torch.Tensor) -> torch.Tensor:
    """The tower's last hidden states without CLS: (B, 64, width) for a 64-px tile."""
    with torch.no_grad():
        return llava.model.vision_tower(pixels).last_hidden_state[:, 1:]


def test_the_conv_stem_keeps_the_patch_grid_and_width():
    stem = ConvStem(patch_size=8, width=64)
    widths = [m.out_channels for m in stem.layers if isinstance(m, torch.nn.Conv2d)]
    assert widths == [16, 32, 64, 64]  # doubling up to the width, then the 1x1
    assert stem(torch.zeros(2, 3, 64, 64)).shape == (2, 64, 8, 8)  # CLIP's patch map: (B, width, grid, grid)
    for kernel in (2, 4):  # the study's variants: inside each patch, centred on it; same grid
        variant = ConvStem(patch_size=8, width=64, kernel=kernel, norm=False)
        assert variant(torch.zeros(1, 3, 64, 64)).shape == (1, 64, 8, 8)
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in variant.layers)
    with pytest.raises(ValueError, match="power-of-two model.patch_size, got 6"):
        ConvStem(patch_size=6, width=64)


def test_a_conv_stem_token_sees_across_its_patch_border(tmp_path):
    """CLIP's patch map reads a patch's own 8x8 pixels only; the stem reads its neighbours' too."""
    pixels = torch.zeros(1, 3, 64, 64)
    nudged = pixels.clone()
    nudged[..., 0, 8] = 1.0  # the first pixel of patch (0, 1), next to patch (0, 0)
    for stem, crosses in (("patch", False), ("conv", True)):
        embed = tiny(tmp_path, vision_stem=stem).model.vision_tower.embeddings.patch_embedding
        with torch.no_grad():
            moved = (embed(nudged) - embed(pixels))[0, :, 0, 0].abs().max()
        assert (moved > 0) == crosses, stem


def test_the_tiny_model_builds_and_reads_images_with_either_stem(tmp_path):
    clip, conv = tiny(tmp_path), tiny(tmp_path, vision_stem="conv")
    pixels = torch.rand(2, 3, 64, 64)
    assert patch_tokens(clip, pixels).shape == patch_tokens(conv, pixels).shape == (2, 64, 64)
    assert isinstance(conv.model.vision_tower.embeddings.patch_embedding, ConvStem)
    assert sum(p.numel() for p in conv.parameters()) > sum(p.numel() for p in clip.parameters())
    with pytest.raises(ValueError, match="vision_stem='resnet'.*patch, conv"):
        tiny(tmp_path, vision_stem="resnet")


def test_a_hugging_face_checkpoint_folder_refuses_the_conv_stem(tmp_path):
    with pytest.raises(ValueError, match="vision_stem='patch'"):
        write_tiny_checkpoint(tmp_path / "ckpt", vision_stem="conv")
