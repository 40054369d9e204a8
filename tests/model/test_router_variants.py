"""Issue 19's cheaper routers: ``router.input_levels`` (fewer tokens), ``router.width`` (a narrower layer)."""

from dataclasses import replace

import pytest
import torch
from stage_config import compose_config
from tiny_batches import LEVELS

from avglab.avg.router import GranularityRouter, filter_instruction
from avglab.core.selector import RouterInput
from avglab.tools.bench.flops import router_flops
from avglab.training.build import build_selector, check_router


def tiles_input(hidden: int = 16, tiles: int = 2) -> RouterInput:
    """Random pooled tiles of every LEVELS level and 3 instruction tokens for one sample per tile."""
    levels = [torch.randn(tiles, hidden, 1, g) for g in LEVELS]
    instruction = torch.randn(tiles, 3, hidden)
    return RouterInput(
        levels, torch.arange(tiles), instruction, torch.ones(tiles, 3, dtype=torch.bool), tiles
    )


def test_input_levels_shorten_the_sequence_and_leave_other_levels_out():
    torch.manual_seed(0)
    router = GranularityRouter(16, LEVELS, k=2, num_heads=4, input_levels=[0, 1]).eval()
    assert router.seq_len == 4 + 8 + 2 and router.voter.shape == (14,)
    inputs = tiles_input()
    with torch.no_grad():
        base = router(inputs)
        assert base.shape == (2, len(LEVELS))  # still scores every level
        middle = [lvl.clone() for lvl in inputs.levels]
        middle[2] += 1.0  # a level the router does not read (nor the filter, which reads the finest)
        torch.testing.assert_close(router(replace(inputs, levels=middle)), base)
        coarse = [lvl.clone() for lvl in inputs.levels]
        coarse[0] += 1.0
        assert not torch.allclose(router(replace(inputs, levels=coarse)), base)


def test_width_projects_tokens_into_a_narrower_layer():
    torch.manual_seed(0)
    paper = GranularityRouter(64, LEVELS, k=2, num_heads=4)
    narrow = GranularityRouter(64, LEVELS, k=2, num_heads=4, width=16)
    assert paper.project is None and narrow.project.weight.shape == (16, 64)
    assert narrow.layer.self_attn.embed_dim == 16 and narrow.mlp[0].in_features == 16
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) < count(paper) / 4
    assert narrow(tiles_input(64)).shape == (2, len(LEVELS))
    # FLOPs: every linear map (the projection included) per token plus attention at the layer's width
    assert router_flops(narrow, 1) < router_flops(paper, 1) / 4
    with pytest.raises(ValueError, match="router.width"):
        GranularityRouter(64, LEVELS, k=2, num_heads=4, width=0)
    with pytest.raises(ValueError, match="num_heads"):
        GranularityRouter(64, LEVELS, k=2, num_heads=4, width=18)


@pytest.mark.parametrize(
    ("router", "levels", "width"),
    [("avg", [0, 1, 2, 3, 4], None), ("avg_coarse", [0, 1, 2], None), ("avg_narrow", [0, 1, 2, 3, 4], 128),
     ("avg_lite", [0, 1, 2], 128)],
)  # fmt: skip
def test_router_configs_build_the_variant(router, levels, width):
    cfg = compose_config(f"router={router}", "model=bench_mid")
    selector = build_selector(cfg.router, 768)
    assert selector.input_levels == levels
    assert (selector.project is None) if width is None else selector.project.out_features == width
    assert selector.seq_len == sum(cfg.router.granularities[i] for i in levels) + cfg.router.k


@pytest.mark.parametrize("levels", ["[0,0]", "[5]", "[-1]", "[]"])
def test_bad_input_levels_fail_before_the_model_is_built(levels):
    cfg = compose_config(f"router.input_levels={levels}")
    with pytest.raises(ValueError, match="router.input_levels"):
        check_router(cfg, 8)


@pytest.mark.parametrize("second", [[True, False, False], [True, True, False]])  # a mask left / none left
def test_dropping_unfilled_instruction_slots_is_exact(second):
    # Instructions shorter than k leave masked slots; the router drops the slots no tile fills (no padding
    # mask at batch size 1, the layer's fast path) and must equal the masked sequence of length L.
    torch.manual_seed(0)
    router = GranularityRouter(16, LEVELS, k=6, num_heads=4).eval()
    inputs = replace(tiles_input(), instruction_mask=torch.tensor([[True, True, False], second]))
    tokens = [lvl.flatten(2).transpose(1, 2) for lvl in inputs.levels]
    kept, valid = filter_instruction(inputs.instruction, inputs.instruction_mask, tokens[-1], 6)
    sequence = torch.cat([*tokens, kept], dim=1)  # (T, L, C) as the paper builds it
    valid = torch.cat([torch.ones(2, sum(LEVELS), dtype=torch.bool), valid], dim=1)
    with torch.no_grad():
        router.train()  # the reference without the inference fast path
        hidden = router.layer(sequence, src_key_padding_mask=~valid)
        expected = torch.einsum("l,tln->tn", router.voter, router.mlp(hidden) * valid[..., None])
        router.eval()
        torch.testing.assert_close(router(inputs), expected, atol=1e-5, rtol=1e-5)
