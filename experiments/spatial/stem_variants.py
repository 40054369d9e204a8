"""``python -m avglab`` with a variant of the tiny tower's conv stem, for the study's probe runs only.

``AVGLAB_STEM=<kernel>:<norm>[:hybrid][:zero]`` replaces the freshly built tower's patch map (run it with
``model.vision_stem=patch``) by three stride-2 convolutions of width 16, 32, 64 and a 1x1, as
``avglab.core.conv_stem.ConvStem`` builds them, with kernel 2 (inside each patch), 3 (the committed stem) or 4
(centred on the patch), ``group`` or ``none`` normalisation; ``hybrid`` adds CLIP's patch map to it, ``zero``
starts its last convolution at zero. Stage outputs load over it (run every stage through this script).

    AVGLAB_STEM=3:none:hybrid:zero python experiments/spatial/stem_variants.py stage=pretrain \
        model=tiny_spatial model.vision_stem=patch ...
"""

import os

import torch
from torch import nn

import avglab.training.build as build
from avglab.core.conv_stem import ConvStem


class StemVariant(ConvStem):
    """``ConvStem`` with a chosen kernel and normalisation, plus CLIP's patch map when ``linear`` is given."""

    def __init__(self, patch: int, width: int, kernel: int, norm: str, linear: nn.Module | None, zero: bool):
        super().__init__(patch, width, kernel=kernel, norm=norm == "group")
        if zero:
            nn.init.zeros_(self.layers[-1].weight)
            nn.init.zeros_(self.layers[-1].bias)
        self.linear = linear

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, width, H / patch, W / patch)."""
        out = super().forward(pixel_values)
        return out if self.linear is None else out + self.linear(pixel_values)


def patched(*args, **kwargs):
    """The tiny builder, then the variant stem."""
    model = original(*args, **kwargs)
    kernel, norm, *flags = os.environ["AVGLAB_STEM"].split(":")
    embeddings = model.model.vision_tower.embeddings
    if not isinstance(embeddings.patch_embedding, nn.Conv2d):
        raise ValueError("AVGLAB_STEM replaces CLIP's patch map: run with model.vision_stem=patch")
    linear = embeddings.patch_embedding if "hybrid" in flags else None
    embeddings.patch_embedding = StemVariant(
        embeddings.patch_size, embeddings.embed_dim, int(kernel), norm, linear, "zero" in flags
    )
    return model


original = build.tiny_llava
if os.environ.get("AVGLAB_STEM"):
    build.tiny_llava = patched

if __name__ == "__main__":
    from avglab.cli import main

    main()
