"""Region geometry of FocusLLaVA's vision-guided sampler (METHOD 2.1): multi-scale max-pooling and packing.

Pure tensor functions, no parameters. The local map is the stitched, *unpadded* map of all local
tiles (LLaVA-NeXT's own crop at full resolution, ``packing.unpad_box``), so padding never enters a
region. It is split into ``window x window`` regions from its top-left corner; regions on the
bottom and right edges may hold fewer real rows or columns, which max-pooling over ``-inf``
padding handles exactly (a cell keeps the max of its real part; a cell with no real token is
dropped).

Packing order ("raster order of cell corners"): every kept cell, whatever its branch, is placed
by its top-left corner in full-resolution coordinates, row-major, and ``image_newline`` ends
every row that has at least one cell starting on it. When every region keeps the finest 1x1-kernel
branch this is exactly LLaVA-NeXT's unpadded local map with one newline per row; when every
region keeps one token it is a pooled map with one newline per region row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from avglab.data.anyres import num_tiles, tile_layout, unpad_box


class FocusConfigError(ValueError):
    """A FocusLLaVA setting that cannot work; the message names the config key."""


@dataclass(frozen=True)
class Branch:
    """One down-sampling branch DS_s: a region of ``window x window`` tokens -> ``rows x cols`` cells.

    Attributes:
        rows: output rows per region.
        cols: output columns per region.
        kernel: max-pooling kernel (window // rows, window // cols) in full-resolution tokens.
    """

    rows: int
    cols: int
    kernel: tuple[int, int]

    @property
    def name(self) -> str:
        """E.g. ``2x2``."""
        return f"{self.rows}x{self.cols}"


def make_branches(shapes: Sequence[Sequence[int]], window: int) -> list[Branch]:
    """Branches from their output shapes per region (paper: 1x1, 2x2, 4x4; 7-branch adds 4x2, 2x4, 2x1, 1x2).

    Raises:
        FocusConfigError: a shape that does not divide the window, duplicates, or an empty list.
    """
    if window < 1:
        raise FocusConfigError(f"focus.vision.window={window}: must be a positive number of tokens")
    if not shapes:
        raise FocusConfigError("focus.vision.branches is empty; give e.g. [[1, 1], [2, 2], [4, 4]]")
    out: list[Branch] = []
    for shape in shapes:
        if len(shape) != 2:
            raise FocusConfigError(f"focus.vision.branches: {list(shape)} is not a [rows, cols] pair")
        rows, cols = int(shape[0]), int(shape[1])
        if rows < 1 or cols < 1 or window % rows or window % cols:
            raise FocusConfigError(
                f"focus.vision.branches: {rows}x{cols} does not divide focus.vision.window={window}; "
                "each branch max-pools a window x window region to rows x cols cells"
            )
        out.append(Branch(rows, cols, (window // rows, window // cols)))
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise FocusConfigError(f"focus.vision.branches has duplicates: {names}")
    return out


def local_map(
    tiles: torch.Tensor, image_size: Sequence[int], grid_pinpoints: list, tile_size: int
) -> torch.Tensor:
    """The stitched, unpadded local map of one image.

    Args:
        tiles: (T, C, g, g) projected tiles; tile 0 is the global view, the rest row-major.
        image_size: original (height, width).
        grid_pinpoints: AnyRes resolutions.
        tile_size: tile side in pixels.

    Returns:
        (C, H, W): the real content of the local tiles at full resolution (LLaVA-NeXT's unpad).
    """
    n_rows, n_cols = tile_layout(image_size, grid_pinpoints, tile_size)
    channels, grid = tiles.shape[1], tiles.shape[-1]
    local = tiles[1:].view(n_rows, n_cols, channels, grid, grid)
    local = local.permute(2, 0, 3, 1, 4).reshape(channels, n_rows * grid, n_cols * grid)  # (C, H, W)
    top, bottom, left, right = unpad_box(image_size, n_rows * grid, n_cols * grid)
    return local[:, top:bottom, left:right]


@dataclass
class RegionPyramid:
    """Every branch of every region of one local map.

    Attributes:
        cells: per branch, (C, Hp/kh, Wp/kw) max-pooled cells (``-inf`` where no real token).
        valid: per branch, (Hp/kh, Wp/kw) bool, cells covering at least one real token.
        regions: (R, C) region features pooled to 1x1 (the selector's input), R = Rr * Rc.
        region_grid: (Rr, Rc) regions per column and row.
    """

    cells: list[torch.Tensor]
    valid: list[torch.Tensor]
    regions: torch.Tensor
    region_grid: tuple[int, int]


def pool_regions(local: torch.Tensor, window: int, branches: list[Branch]) -> RegionPyramid:
    """Region-level multi-scale max-pooling (METHOD 2.1) of one local map.

    Args:
        local: (C, H, W) unpadded local map.
        window: region side w in tokens.
        branches: the down-sampling branches.
    """
    channels, height, width = local.shape
    rr, rc = -(-height // window), -(-width // window)
    pad = (0, rc * window - width, 0, rr * window - height)
    padded = F.pad(local, pad, value=float("-inf"))  # (C, Hp, Wp): padding never wins a max
    real = F.pad(torch.ones(1, height, width, device=local.device), pad)  # (1, Hp, Wp)
    cells, valid = [], []
    for branch in branches:
        cells.append(F.max_pool2d(padded[None], branch.kernel)[0])
        valid.append(F.max_pool2d(real[None], branch.kernel)[0, 0] > 0)
    regions = F.max_pool2d(padded[None], window)[0].flatten(1).transpose(0, 1)  # (R, C)
    return RegionPyramid(cells, valid, regions, (rr, rc))


def gather_choice(
    pyramid: RegionPyramid, choice: torch.Tensor, scale: torch.Tensor, window: int, branches: list[Branch]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cells of the chosen branch of every region, in raster order of their top-left corners.

    Args:
        pyramid: output of ``pool_regions``.
        choice: (R,) branch index per region (row-major regions).
        scale: (R,) factor applied to each region's tokens (1 at inference; Eq. 2's Top1 in training).
        window: region side w.
        branches: the branches.

    Returns:
        tokens (n, C) in packing order and their (n,) top rows (full-resolution), for newlines.
    """
    rr, rc = pyramid.region_grid
    choice_map, scale_map = choice.view(rr, rc), scale.view(rr, rc)
    width = rc * window
    tokens, keys = [], []
    for s, branch in enumerate(branches):
        rep_r, rep_c = window // branch.kernel[0], window // branch.kernel[1]
        mine = choice_map.repeat_interleave(rep_r, 0).repeat_interleave(rep_c, 1) == s  # (Hp/kh, Wp/kw)
        picked = mine & pyramid.valid[s]
        if not bool(picked.any()):
            continue
        where = picked.nonzero()  # (n_s, 2) cell coordinates
        factor = scale_map.repeat_interleave(rep_r, 0).repeat_interleave(rep_c, 1)[picked]  # (n_s,)
        cells = pyramid.cells[s][:, picked].transpose(0, 1)  # (n_s, C)
        tokens.append(cells * factor[:, None].to(cells.dtype))
        top, left = where[:, 0] * branch.kernel[0], where[:, 1] * branch.kernel[1]
        keys.append(top * (width + 1) + left)
    key = torch.cat(keys)
    order = torch.argsort(key, stable=True)
    return torch.cat(tokens)[order], (key[order] // (width + 1))


def add_newlines(tokens: torch.Tensor, rows: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """Inserts ``newline`` after the last token of every row.

    Args:
        tokens: (n, C) tokens sorted by (row, column).
        rows: (n,) their top rows, non-decreasing.
        newline: (C,) the learned ``image_newline``.

    Returns:
        (n + n_rows, C), differentiable in ``tokens`` and ``newline``.
    """
    _, counts = torch.unique_consecutive(rows, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(counts), device=tokens.device), counts)  # (n,)
    token_pos = torch.arange(len(tokens), device=tokens.device) + group
    newline_pos = counts.cumsum(0) + torch.arange(len(counts), device=tokens.device)
    out = tokens.new_zeros(len(tokens) + len(counts), tokens.shape[1])
    out = out.index_copy(0, token_pos, tokens)
    return out.index_copy(0, newline_pos, newline.to(tokens)[None].expand(len(counts), -1))


def focus_token_count(
    image_size: Sequence[int], grid_pinpoints: list, tile_size: int, grid: int, branch: Branch
) -> int:
    """Tokens one image feeds the LLM when every region keeps ``branch`` (no weights needed).

    Global view (g*g) + cells of the unpadded local map + one newline per row of cells. With the
    1x1-kernel branch this equals LLaVA-NeXT's full count (``packing.count_visual_tokens``).
    """
    if num_tiles(image_size, grid_pinpoints, tile_size) == 1:
        return grid * grid + 1
    n_rows, n_cols = tile_layout(image_size, grid_pinpoints, tile_size)
    top, bottom, left, right = unpad_box(image_size, n_rows * grid, n_cols * grid)
    height, width = bottom - top, right - left
    kh, kw = branch.kernel
    rows, cols = -(-height // kh), -(-width // kw)
    # Regions start at the crop's corner and kernels divide the window, so cells never straddle
    # regions and only the bottom/right edge cells are partial.
    return grid * grid + rows * cols + rows
