"""LLaVA-NeXT's AnyRes geometry without weights: tiles, layout, unpad boxes, visual-token counts.

What an image of (height, width) becomes before any model runs, from transformers' own llava_next
helpers: the data pipeline sizes sequences with it (``data.max_length`` counts visual tokens) and the
core packs pooled tiles with it (``avglab.core.packing``).
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
