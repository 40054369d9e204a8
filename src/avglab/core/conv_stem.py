"""A convolutional stem for the tiny vision tower (``model.vision_stem=conv``).

Xiao et al. 2021, "Early Convolutions Help Transformers See Better". CLIP cuts the image into patches
with one linear map per patch, so a randomly initialised tower has to build every shape cue (an edge's
angle, a corner, a curve across two patches) in its attention layers from the answer loss alone, and the
tiny one does not do so within a laptop budget. A few 3x3 stride-2 convolutions in place of that map see
across patch borders and compute local edge features before the first attention layer: on the spatial set,
through the same stages, shape answers go from 74.5-88.0% to 99.5-100% (experiments/spatial/README.md).

The stem keeps the patch grid and the width, so tokens, granularities and position codes are as before.
It is not part of transformers' CLIP: avglab saves and loads a model with it (stage outputs, ``init_from``),
``python -m avglab.tools.export`` refuses it.
"""

from __future__ import annotations

import torch
from torch import nn

VISION_STEMS = ("patch", "conv")


class ConvStem(nn.Module):
    """3x3 stride-2 convolutions, each normalised (GroupNorm of one group) and GELU, then a 1x1 to the width.

    Widths double up to the tower's: a patch of 8 gets three convolutions of width/4, width/2 and width.

    Args:
        patch_size: the tower's patch side, a power of two (one stride-2 convolution per halving).
        width: the tower's hidden size.
        kernel: the convolutions' side (3; the study also measured 2, inside each patch, and 4).
        norm: GroupNorm after each convolution (without it the convolutions get biases).
    """

    def __init__(self, patch_size: int, width: int, in_channels: int = 3, kernel: int = 3, norm: bool = True):
        super().__init__()
        halvings = patch_size.bit_length() - 1
        if patch_size < 2 or 1 << halvings != patch_size:
            raise ValueError(
                f"model.vision_stem=conv needs a power-of-two model.patch_size, got {patch_size}"
            )
        layers: list[nn.Module] = []
        channels = in_channels
        for i in reversed(range(halvings)):
            out = max(width >> i, 1)
            layers.append(
                nn.Conv2d(channels, out, kernel, stride=2, padding=(kernel - 1) // 2, bias=not norm)
            )
            layers += [nn.GroupNorm(1, out), nn.GELU()] if norm else [nn.GELU()]
            channels = out
        layers.append(nn.Conv2d(channels, width, 1))
        self.layers = nn.Sequential(*layers)

    @property
    def weight(self) -> torch.Tensor:
        """The last convolution's weight: CLIP's embeddings read ``patch_embedding.weight.dtype``."""
        return self.layers[-1].weight

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch map.

        Args:
            pixel_values: (B, 3, H, W).

        Returns:
            (B, width, H / patch, W / patch), as CLIP's patch convolution gives.
        """
        return self.layers(pixel_values)


def install_vision_stem(vision_tower: nn.Module, kind: str) -> None:
    """Gives a CLIP tower the configured stem (``patch``: CLIP's own, left as it is).

    Args:
        vision_tower: a ``CLIPVisionModel``.
        kind: one of ``VISION_STEMS``.

    Raises:
        ValueError: an unknown kind, or a patch size the conv stem cannot reach.
    """
    if kind not in VISION_STEMS:
        raise ValueError(f"model.vision_stem={kind!r}: choose one of {', '.join(VISION_STEMS)}")
    if kind == "patch":
        return
    embeddings = getattr(vision_tower, "vision_model", vision_tower).embeddings
    embeddings.patch_embedding = ConvStem(embeddings.patch_size, embeddings.embed_dim)
