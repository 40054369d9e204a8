import pytest
import torch
import torch.nn.functional as F

from avglab.core.packing import pack_image
from avglab.core.scaler import GranularityError, GranularityScaler, valid_granularities
from avglab.data.anyres import count_visual_tokens

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's real geometry
PAPER = [36, 72, 144, 288, 576]


def test_672_square_token_counts_match_the_paper_geometry():
    scaler = GranularityScaler(24, PAPER)
    counts = [count_visual_tokens((672, 672), PINPOINTS, 336, 24, k) for k in scaler.kernels]
    assert counts[::-1] == [2928, 1488, 744, 384, 192]


@pytest.mark.parametrize("size", [(672, 672), (500, 800), (900, 300), (336, 1000)])
def test_packing_yields_the_counted_tokens_at_every_level(size):
    scaler = GranularityScaler(24, PAPER)
    from avglab.data.anyres import num_tiles

    tiles = torch.randn(num_tiles(size, PINPOINTS, 336), 1, 24, 24)
    for level, kernel in enumerate(scaler.kernels):
        packed = pack_image(scaler.pool(tiles, level), size, PINPOINTS, 336, 24, kernel, torch.zeros(1))
        assert packed.shape == (count_visual_tokens(size, PINPOINTS, 336, 24, kernel), 1)


def test_non_square_levels_keep_real_content():
    # Pitfall 2: at 288 tokens per tile a 672x672 image must keep its whole 48x24 local map.
    scaler = GranularityScaler(24, PAPER)
    tiles = torch.randn(5, 1, 24, 24)
    packed = pack_image(
        scaler.pool(tiles, 3), (672, 672), PINPOINTS, 336, 24, scaler.kernels[3], torch.zeros(1)
    )
    assert len(packed) == 288 + 48 * 24 + 48


def test_one_pool_per_level_equals_alternating_1x2_2x1_pooling():
    x = torch.randn(2, 3, 24, 24)
    scaler = GranularityScaler(24, PAPER)
    step = x
    expected = [x]
    for kernel in [(1, 2), (2, 1), (1, 2), (2, 1)]:
        step = F.avg_pool2d(step, kernel)
        expected.append(step)
    for got, want in zip(scaler(x), expected[::-1], strict=True):
        torch.testing.assert_close(got, want)


def test_tiny_grid_levels():
    assert valid_granularities(12)[-5:] == [9, 18, 36, 72, 144]
    assert GranularityScaler(12, [9, 18, 36, 72, 144]).level_shape(1) == (6, 3)


@pytest.mark.parametrize("levels", [[100], [576, 36], [], [36, 36, 576]])
def test_bad_granularities_name_the_config_key(levels):
    with pytest.raises(GranularityError, match="router.granularities"):
        GranularityScaler(24, levels)
