import math

import pytest
import torch

from avglab.avg.losses import apply_token_cost, ranking_loss, rglf_loss


def log_softmax(xs):
    z = math.log(sum(math.exp(x) for x in xs))
    return [x - z for x in xs]


def test_ranking_and_ce_match_a_hand_computed_example():
    logits = [2.0, 0.0, 1.0]
    r = [-1.0, -0.5, -2.0]  # best first: level 1, level 0, level 2
    s = log_softmax(logits)
    # Eq. 5-6 pairs (i < j in rank order), margin (j - i) * (r_vi - r_vj):
    pairs = [
        max(0.0, s[0] - s[1] + 1 * (r[1] - r[0])),  # v1=1, v2=0
        max(0.0, s[2] - s[1] + 2 * (r[1] - r[2])),  # v1=1, v3=2
        max(0.0, s[2] - s[0] + 1 * (r[0] - r[2])),  # v2=0, v3=2
    ]
    rank = sum(pairs)
    ce = -s[1]
    out = rglf_loss(torch.tensor([logits]), torch.tensor([r]), alpha=0.1)
    assert math.isclose(out.rank.item(), rank, rel_tol=1e-6)
    assert math.isclose(out.ce.item(), ce, rel_tol=1e-6)
    assert math.isclose(out.total.item(), rank + 0.1 * ce, rel_tol=1e-6)
    assert math.isclose(rank, 6.5, rel_tol=1e-6)  # 2.5 + 4.0 + 0.0 worked by hand
    assert out.best.tolist() == [1]


def test_uniform_router_pays_the_margins():
    r = torch.tensor([[-1.0, -0.5, -2.0]])
    loss = ranking_loss(torch.log(torch.full((1, 3), 1 / 3)), r)
    assert math.isclose(loss.item(), 0.5 + 3.0 + 1.0, rel_tol=1e-6)


def test_samples_without_answers_or_preference_are_skipped_not_nan():
    logits = torch.randn(3, 4, requires_grad=True)
    feedback = torch.tensor(
        [
            [float("nan")] * 4,  # no answer token
            [-1.0, -1.0, -1.0, -1.0],  # text-only: every level ties
            [-3.0, -1.0, -2.0, -1.5],
        ]
    )
    out = rglf_loss(logits, feedback)
    assert out.usable.tolist() == [False, False, True]
    assert torch.isfinite(out.total)
    expected = rglf_loss(logits[2:], feedback[2:])
    torch.testing.assert_close(out.total, expected.total)
    out.total.backward()
    assert logits.grad[:2].abs().sum() == 0 and logits.grad[2].abs().sum() > 0


def test_no_usable_sample_gives_zero_with_a_graph():
    logits = torch.zeros(2, 3, requires_grad=True)
    out = rglf_loss(logits, torch.full((2, 3), float("nan")))
    assert out.total.item() == 0.0 and out.total.requires_grad


def test_tied_pairs_carry_no_ranking_signal():
    s = [math.log(0.2), math.log(0.5), math.log(0.3)]
    tied = ranking_loss(torch.tensor([s]), torch.tensor([[-1.0, -1.0, -2.0]]))
    # levels 0 and 1 tie, so only the pairs against level 2 count, at rank distances 2 and 1
    # (either order of the tie gives the same sum): (s2 - s_a + 2*1) + (s2 - s_b + 1*1)
    assert math.isclose(tied.item(), 2 * s[2] - s[0] - s[1] + 3, rel_tol=1e-6)


def test_token_cost_prefers_fewer_tokens_on_ties():
    r = torch.tensor([[-1.0, -1.0]])
    priced = apply_token_cost(r, torch.tensor([[10, 40]]), 0.01)
    assert priced[0, 0] > priced[0, 1]
    assert apply_token_cost(r, torch.tensor([[10, 40]]), 0.0) is r


def test_log2_token_cost_prices_each_doubling_the_same():
    r = torch.tensor([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    tokens = torch.tensor([[10, 20, 40], [0, 0, 0]])  # the second row: a text-only sample
    priced = apply_token_cost(r, tokens, 0.05, scale="log2")
    base = -1.0 - 0.05 * math.log2(10)
    assert torch.allclose(priced[0], torch.tensor([base, base - 0.05, base - 0.1]))
    assert torch.equal(priced[1], r[1])  # no visual tokens, no price, and no -inf from log2(0)
    with pytest.raises(ValueError, match="token_cost_scale"):
        apply_token_cost(r, tokens, 0.05, scale="log")
