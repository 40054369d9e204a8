"""AnyRes packing at any granularity: stitch local tiles, unpad, append ``image_newline``.

Hugging Face's ``pack_image_features`` hard-codes the full grid and infers the padding from the
pooled map's own aspect ratio, which crops real content at non-square levels (METHOD pitfall 2:
672x672 gives 888 tokens at 288 instead of 1488). Here the crop box is computed once in
full-resolution token coordinates with transformers' ``unpad_image`` and then mapped onto the
pooled map, keeping every pooled cell that overlaps real content.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)


def num_tiles(image_size: Sequence[int], grid_pinpoints: list, tile_size: int) -> int:
    """Tiles (global view + local tiles) LLaVA-NeXT's AnyRes cuts an image of (height, width) into."""
    return image_size_to_num_patches(list(image_size), grid_pinpoints, tile_size)


def tile_layout(image_size: Sequence[int], grid_pinpoints: list, tile_size: int) -> tuple[int, int]:
    """Rows and columns of local tiles for an image of (height, width)."""
    return get_anyres_image_grid_shape(list(image_size), grid_pinpoints, tile_size)


def unpad_box(image_size: Sequence[int], full_rows: int, full_cols: int) -> tuple[int, int, int, int]:
    """Crop box (top, bottom, left, right) of real content on the full-resolution stitched map."""
    kept = unpad_image(torch.empty(0, full_rows, full_cols), list(image_size))
    rows, cols = kept.shape[1:]
    top, left = (full_rows - rows) // 2, (full_cols - cols) // 2
    return top, top + rows, left, left + cols


def pooled_box(
    image_size: Sequence[int], layout: tuple[int, int], grid: int, kernel: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Crop box on the map pooled with ``kernel``: every cell whose window overlaps real content."""
    top, bottom, left, right = unpad_box(image_size, layout[0] * grid, layout[1] * grid)
    kh, kw = kernel
    return top // kh, math.ceil(bottom / kh), left // kw, math.ceil(right / kw)


def count_visual_tokens(
    image_size: Sequence[int],
    grid_pinpoints: list,
    tile_size: int,
    grid: int,
    kernel: tuple[int, int] = (1, 1),
) -> int:
    """Visual tokens fed to the LLM for one image, global view + unpadded local map + newlines.

    Needs no weights: 672x672 with the real 336-px geometry gives 2928 at the full grid.
    """
    rows, cols = grid // kernel[0], grid // kernel[1]
    if num_tiles(image_size, grid_pinpoints, tile_size) == 1:
        return rows * cols + 1
    layout = tile_layout(image_size, grid_pinpoints, tile_size)
    top, bottom, left, right = pooled_box(image_size, layout, grid, kernel)
    return rows * cols + (bottom - top) * (right - left + 1)


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
