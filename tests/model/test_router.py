import torch
from tiny_batches import LEVELS, select_rows

from avglab.avg.router import GranularityRouter, filter_instruction
from avglab.core.selector import RouterInput


def test_filter_never_picks_padding_and_keeps_most_similar():
    visual = torch.tensor([[[1.0, 0.0], [1.0, 0.1]]])  # (T=1, V=2, C=2)
    instruction = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [5.0, 5.0], [9.0, 0.0]]])
    mask = torch.tensor([[True, True, True, False]])  # the last slot is padding, though most similar
    kept, valid = filter_instruction(instruction, mask, visual, k=2)
    assert valid.tolist() == [[True, True]]
    assert kept[0, 0].tolist() == [1.0, 0.0] and kept[0, 1].tolist() == [5.0, 5.0]
    kept, valid = filter_instruction(instruction, mask, visual, k=5)  # fewer valid than k
    assert valid.sum() == 3 and (kept[0][~valid[0]] == 0).all()


def test_router_instruction_changes_logits_and_image_only_ignores_it(routed_core, batch):
    enc = routed_core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    other = dict(batch, input_ids=batch["input_ids"].roll(1, dims=1))
    with torch.no_grad():
        a = routed_core.selector(routed_core.router_input(enc, batch["input_ids"], batch["instruction_mask"]))
        b = routed_core.selector(routed_core.router_input(enc, other["input_ids"], batch["instruction_mask"]))
        assert not torch.allclose(a, b)
        image_only = GranularityRouter(
            routed_core.config.text_config.hidden_size, LEVELS, k=0, num_heads=4
        ).eval()
        c = image_only(routed_core.router_input(enc, batch["input_ids"], batch["instruction_mask"]))
        d = image_only(routed_core.router_input(enc, other["input_ids"], batch["instruction_mask"]))
    torch.testing.assert_close(c, d)


def test_router_attends_across_tokens_within_a_tile():
    # Pitfall 1: a tile's logits depend on its own tokens jointly, never on other tiles.
    router = GranularityRouter(8, [1, 4], k=0, num_heads=2).eval()
    levels = [torch.randn(3, 8, 1, 1), torch.randn(3, 8, 2, 2)]
    owner = torch.tensor([0, 1, 2])
    empty = torch.zeros(3, 0, 8)
    inputs = RouterInput(levels, owner, empty, torch.zeros(3, 0, dtype=torch.bool), 3)
    base = router(inputs)
    changed = [levels[0].clone(), levels[1].clone()]
    changed[1][2] += 1.0  # only tile 2 changes
    out = router(RouterInput(changed, owner, empty, torch.zeros(3, 0, dtype=torch.bool), 3))
    torch.testing.assert_close(out[:2], base[:2])
    assert not torch.allclose(out[2], base[2])


def test_tile_logits_are_averaged_per_image(routed_core, batch):
    one = select_rows(batch, [0])
    enc = routed_core.encode(one["pixel_values"], one["image_sizes"], one["has_image"])
    inputs = routed_core.router_input(enc, one["input_ids"], one["instruction_mask"])
    with torch.no_grad():
        per_image = routed_core.selector(inputs)
        tiles = len(inputs.tile_owner)
        spread = RouterInput(
            inputs.levels,
            torch.arange(tiles),
            inputs.instruction.expand(tiles, -1, -1),
            inputs.instruction_mask.expand(tiles, -1),
            tiles,
        )
        per_tile = routed_core.selector(spread)
    torch.testing.assert_close(per_image[0], per_tile.mean(0), atol=1e-5, rtol=1e-5)
