"""AnyRes packing at any granularity: stitch local tiles, unpad, append ``image_newline``.

Hugging Face's ``pack_image_features`` hard-codes the full grid and infers the padding from the
pooled map's own aspect ratio, which crops real content at non-square levels (METHOD pitfall 2:
672x672 gives 888 tokens at 288 instead of 1488). Here the crop box is computed once in
full-resolution token coordinates with transformers' ``unpad_image`` and then mapped onto the
pooled map, keeping every pooled cell that overlaps real content.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from avglab.data.anyres import pooled_box, tile_layout


def pack_image(
    tiles: torch.Tensor,
    image_size: Sequence[int],
    grid_pinpoints: list,
    tile_size: int,
    grid: int,
    kernel: tuple[int, int],
    image_newline: torch.Tensor,
) -> torch.Tensor:
    """Packs one image's pooled tiles into the LLM's visual token sequence.

    Args:
        tiles: (T, C, rows, cols) pooled tiles; tile 0 is the global view, the rest row-major.
        image_size: original (height, width).
        grid_pinpoints: AnyRes resolutions.
        tile_size: tile side in pixels.
        grid: tokens per tile side at full resolution.
        kernel: pooling kernel of this level, used to map the unpad box.
        image_newline: (C,) learned row terminator.

    Returns:
        (n_tokens, C): global view tokens, then the unpadded local map row by row, each row
        ended by ``image_newline``.
    """
    base = tiles[0].flatten(1).transpose(0, 1)  # (rows*cols, C)
    if tiles.shape[0] == 1:
        return torch.cat([base, image_newline[None].to(base)], dim=0)
    n_rows, n_cols = tile_layout(image_size, grid_pinpoints, tile_size)
    channels, rows, cols = tiles.shape[1:]
    local = tiles[1:].view(n_rows, n_cols, channels, rows, cols)
    local = local.permute(2, 0, 3, 1, 4).reshape(channels, n_rows * rows, n_cols * cols)  # (C, H, W)
    top, bottom, left, right = pooled_box(image_size, (n_rows, n_cols), grid, kernel)
    local = local[:, top:bottom, left:right]
    newline = image_newline[:, None, None].to(local).expand(channels, local.shape[1], 1)
    local = torch.cat([local, newline], dim=2)  # (C, H', W'+1)
    return torch.cat([base, local.flatten(1).transpose(0, 1)], dim=0)
