"""Visual granularity scaler (AVG-LLaVA Sec. 3.1, METHOD 1.1): parameter-free average pooling.

Granularities are named by the number of tokens they leave per tile, ordered coarse to fine
(the paper's X^1..X^N, e.g. 36, 72, 144, 288, 576 for a 24x24 grid). Alternating 1x2 and 2x1
pooling equals one ``avg_pool2d`` per level with kernel (2^m, 2^m) or (2^m, 2^(m+1)), because the
pooling windows nest; the kernel halves the width first (24x24 -> 24x12).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


class GranularityError(ValueError):
    """A granularity list that cannot be realised on the vision grid."""


def pooling_kernel(grid: int, tokens_per_tile: int) -> tuple[int, int]:
    """Kernel (rows, cols) that pools a ``grid x grid`` tile down to ``tokens_per_tile`` tokens.

    Raises:
        GranularityError: if the count is not ``grid**2 / 2**j`` or the kernel does not tile the grid.
    """
    ratio = grid * grid / tokens_per_tile if tokens_per_tile > 0 else 0
    if ratio < 1 or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
        raise GranularityError(
            f"router.granularities: {tokens_per_tile} tokens per tile is not {grid}x{grid}/2^j; "
            f"valid values for this vision grid are {valid_granularities(grid)}"
        )
    m = int(math.log2(ratio))
    kernel = (2 ** (m // 2), 2 ** (m - m // 2))
    if grid % kernel[0] or grid % kernel[1]:
        raise GranularityError(
            f"router.granularities: {tokens_per_tile} tokens per tile needs a {kernel} pooling kernel that "
            f"does not divide the {grid}x{grid} grid; valid values are {valid_granularities(grid)}"
        )
    return kernel


def valid_granularities(grid: int) -> list[int]:
    """Token counts per tile reachable by nested 1x2/2x1 pooling of a ``grid x grid`` tile."""
    out, rows, cols = [], grid, grid
    while True:
        out.append(rows * cols)
        if cols % 2 == 0 and cols >= rows:
            cols //= 2
        elif rows % 2 == 0:
            rows //= 2
        else:
            return sorted(out)


class GranularityScaler(torch.nn.Module):
    """Pools per-tile projected grids to every configured granularity (no parameters).

    Args:
        grid: tokens per tile side at full resolution (24 for CLIP ViT-L/14-336).
        granularities: tokens per tile of each level, coarse to fine.
    """

    def __init__(self, grid: int, granularities: Sequence[int]):
        super().__init__()
        levels = list(granularities)
        if not levels:
            raise GranularityError("router.granularities is empty; give at least one level, e.g. [576]")
        if levels != sorted(set(levels)):
            raise GranularityError(
                f"router.granularities must be strictly increasing (coarse to fine), got {levels}"
            )
        self.grid = grid
        self.granularities = levels
        self.kernels = [pooling_kernel(grid, t) for t in levels]

    @property
    def num_levels(self) -> int:
        """N, the number of granularities."""
        return len(self.granularities)

    def level_shape(self, level: int) -> tuple[int, int]:
        """Rows and columns of one tile at ``level``."""
        kh, kw = self.kernels[level]
        return self.grid // kh, self.grid // kw

    def pool(self, tiles: torch.Tensor, level: int) -> torch.Tensor:
        """Pools tiles to one level.

        Args:
            tiles: (T, C, grid, grid) projected tile features.
            level: index into ``granularities``.

        Returns:
            (T, C, rows, cols) pooled features.
        """
        kernel = self.kernels[level]
        if kernel == (1, 1):
            return tiles
        return F.avg_pool2d(tiles, kernel_size=kernel, stride=kernel)

    def forward(self, tiles: torch.Tensor) -> list[torch.Tensor]:
        """All levels of a stack of tiles, coarse to fine: a list of (T, C, rows_l, cols_l)."""
        return [self.pool(tiles, level) for level in range(self.num_levels)]
