"""FocusLLaVA's vision-guided sampler: region shapes, token counts, packing and the balance loss."""

import pytest
import torch
from tiny_batches import LEVELS, SIZES

from avglab.core.model import AvgCore
from avglab.focus.regions import (
    FocusConfigError,
    add_newlines,
    focus_token_count,
    gather_choice,
    local_map,
    make_branches,
    pool_regions,
)
from avglab.focus.vision_sampler import VisionSampler, balance_loss

THREE = [[1, 1], [2, 2], [4, 4]]
SEVEN = THREE + [[4, 2], [2, 4], [2, 1], [1, 2]]


def project(llava, batch):
    core = AvgCore(llava, LEVELS).eval()
    with torch.no_grad():
        return core, *core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])


def run_sampler(llava, batch, sampler, force=None, projected=None):
    core, tiles, owner = projected or project(llava, batch)
    sampler.force_branch = force
    with torch.no_grad():
        return sampler(
            tiles,
            owner,
            batch["image_sizes"],
            batch["has_image"],
            llava.config.image_grid_pinpoints,
            core.tile_size,
            llava.model.image_newline,
        )


@pytest.mark.parametrize(
    ("window", "branches"), [(4, THREE), (4, SEVEN), (2, [[1, 1], [2, 2], [2, 1], [1, 2]]), (8, THREE)]
)
def test_every_branch_and_window_gives_the_predicted_token_count(llava, batch, window, branches):
    sampler = VisionSampler(128, 8, window, branches).eval()
    grid, pinpoints = 8, llava.config.image_grid_pinpoints
    projected = project(llava, batch)
    _, tiles, owner = projected
    for s, branch in enumerate(sampler.branches):
        out = run_sampler(llava, batch, sampler, force=s, projected=projected)
        for b, size in enumerate(SIZES):
            expected = focus_token_count(size, pinpoints, 64, grid, branch)
            assert out.visual[b].shape == (expected, 128), (branch.name, size)
        regions = out.region_owner.bincount(minlength=len(SIZES))
        for b, size in enumerate(SIZES):  # regions tile the unpadded local map with ceil division
            _, height, width = local_map(tiles[owner == b], size, pinpoints, 64).shape
            assert regions[b] == -(-height // window) * -(-width // window)


def test_hand_counted_geometry():
    # 128x128 image: 2x2 tiles of 8x8 -> a 16x16 map, no padding; w=4 gives 4x4 regions.
    pinpoints = [[64, 128], [128, 64], [128, 128], [192, 64], [64, 192]]
    b1, b2, b4 = make_branches(THREE, 4)
    assert focus_token_count((128, 128), pinpoints, 64, 8, b1) == 64 + 16 + 4  # 16 cells + 4 newlines
    assert focus_token_count((128, 128), pinpoints, 64, 8, b2) == 64 + 64 + 8
    assert focus_token_count((128, 128), pinpoints, 64, 8, b4) == 64 + 256 + 16  # = LLaVA-NeXT's full count
    # 96x128: the stitched 16x16 map unpads to 12x16 rows; w=4 gives 3x4 regions.
    assert focus_token_count((96, 128), pinpoints, 64, 8, b1) == 64 + 12 + 3
    assert focus_token_count((96, 128), pinpoints, 64, 8, b2) == 64 + 48 + 6


def test_finest_branch_everywhere_is_llava_next_packing(llava, batch):
    sampler = VisionSampler(128, 8, 4, THREE).eval()
    out = run_sampler(llava, batch, sampler, force=2)
    core = AvgCore(llava, LEVELS).eval()
    with torch.no_grad():
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        full = core.pack(encoded, batch["image_sizes"], torch.full((len(SIZES),), len(LEVELS) - 1))
    for ours, ref in zip(out.visual, full, strict=True):
        torch.testing.assert_close(ours, ref)


def test_partial_regions_take_the_max_of_their_real_part():
    local = torch.arange(2 * 5 * 6, dtype=torch.float).view(2, 5, 6)  # 5x6 map, w=4: 2x2 regions, ragged
    branches = make_branches(THREE, 4)
    pyramid = pool_regions(local, 4, branches)
    assert pyramid.region_grid == (2, 2)
    assert pyramid.valid[0].tolist() == [[True, True], [True, True]]
    assert pyramid.valid[2].sum() == 30  # only real tokens at full resolution
    torch.testing.assert_close(
        pyramid.regions[3], local[:, 4:, 4:].amax(dim=(1, 2))
    )  # bottom-right: 1x2 real
    torch.testing.assert_close(pyramid.cells[1][:, 2, 2], local[:, 4:5, 4:6].amax(dim=(1, 2)))


def test_mixed_choices_are_packed_in_raster_order_with_newlines():
    local = torch.arange(32, dtype=torch.float).view(1, 4, 8)  # two 4x4 regions side by side
    branches = make_branches(THREE, 4)
    pyramid = pool_regions(local, 4, branches)
    tokens, rows = gather_choice(pyramid, torch.tensor([0, 1]), torch.ones(2), 4, branches)
    # region 0 -> one 4x4 max at (0,0); region 1 -> 2x2 cells at (0,4), (0,6), (2,4), (2,6)
    assert rows.tolist() == [0, 0, 0, 2, 2]
    assert tokens[:, 0].tolist() == [27.0, 13.0, 15.0, 29.0, 31.0]
    packed = add_newlines(tokens, rows, torch.tensor([-1.0]))
    assert packed[:, 0].tolist() == [27.0, 13.0, 15.0, -1.0, 29.0, 31.0, -1.0]


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    choice = probs.argmax(-1)  # branches 0, 0, 1, 2 -> f = [0.5, 0.25, 0.25]
    # P = column means = [0.4, 0.275, 0.325]; sum f*P = 0.2 + 0.06875 + 0.08125 = 0.35
    torch.testing.assert_close(balance_loss(probs, choice, alpha=0.1), torch.tensor(0.035))
    weighted = balance_loss(probs, choice, alpha=0.1, weights=[0.5, 1.0, 1.5])
    torch.testing.assert_close(weighted, torch.tensor(0.1 * (0.5 * 0.2 + 0.06875 + 1.5 * 0.08125)))
    probs.requires_grad_(True)
    balance_loss(probs, choice, alpha=0.1).backward()
    # d/dp_ri = alpha * f_i / R: only P carries gradient
    torch.testing.assert_close(probs.grad[0], torch.tensor([0.5, 0.25, 0.25]) * 0.1 / 4)


def test_straight_through_scaling_keeps_values_and_passes_gradients(llava, batch):
    torch.manual_seed(0)
    sampler = VisionSampler(128, 8, 4, THREE).train()
    core, tiles, owner = project(llava, batch)
    args = (batch["image_sizes"], batch["has_image"], llava.config.image_grid_pinpoints, 64)
    out = sampler(tiles, owner, *args, llava.model.image_newline)
    sum(v.sum() for v in out.visual).backward()
    assert sampler.fc.weight.grad is not None and sampler.fc.weight.grad.abs().sum() > 0
    with torch.no_grad():
        frozen = sampler.eval()(tiles, owner, *args, llava.model.image_newline)
    for a, b in zip(out.visual, frozen.visual, strict=True):
        torch.testing.assert_close(a.detach(), b)


@pytest.mark.parametrize(
    ("window", "branches", "key"),
    [
        (3, THREE, "focus.vision.branches"),
        (4, [], "focus.vision.branches"),
        (0, THREE, "focus.vision.window"),
    ],
)
def test_bad_branch_config_names_the_key(window, branches, key):
    with pytest.raises(FocusConfigError, match=key):
        make_branches(branches, window)
