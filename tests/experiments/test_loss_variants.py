"""Table 4 (f) and (g): the loss without its ranking or its CE term, checked against hand computation."""

import math

import pytest
import torch

from avglab.avg.losses import rglf_loss

LOGITS = [0.5, -0.2, 0.1]
FEEDBACK = [-1.0, -0.5, -2.0]  # best level 1, then 0, then 2


def log_softmax(x):
    z = math.log(sum(math.exp(v) for v in x))
    return [v - z for v in x]


def hand_rank(s, r):
    """Eq. 5 with the Eq. 6 margin, pair by pair."""
    order = sorted(range(len(r)), key=lambda i: -r[i])
    total = 0.0
    for i in range(len(order)):
        for j in range(i + 1, len(order)):
            a, b = order[i], order[j]
            total += max(0.0, s[b] - s[a] + (j - i) * (r[a] - r[b]))
    return total


def test_no_ranking_loss_is_the_ce_alone():
    s = log_softmax(LOGITS)
    out = rglf_loss(torch.tensor([LOGITS]), torch.tensor([FEEDBACK]), alpha=1.0, rank_weight=0.0)
    assert out.total.item() == pytest.approx(-s[1], rel=1e-5)
    full = rglf_loss(torch.tensor([LOGITS]), torch.tensor([FEEDBACK]), alpha=1.0)
    assert full.total.item() == pytest.approx(hand_rank(s, FEEDBACK) - s[1], rel=1e-5)


def test_no_ce_loss_is_the_ranking_sum_alone():
    s = log_softmax(LOGITS)
    out = rglf_loss(torch.tensor([LOGITS]), torch.tensor([FEEDBACK]), alpha=0.0)
    assert out.total.item() == pytest.approx(hand_rank(s, FEEDBACK), rel=1e-5)
    assert out.total.item() != pytest.approx(
        rglf_loss(torch.tensor([LOGITS]), torch.tensor([FEEDBACK])).total.item()
    )


def test_no_ranking_loss_gradient_comes_from_the_ce_only():
    logits = torch.tensor([LOGITS], requires_grad=True)
    rglf_loss(logits, torch.tensor([FEEDBACK]), alpha=1.0, rank_weight=0.0).total.backward()
    expected = torch.softmax(torch.tensor(LOGITS), -1) - torch.nn.functional.one_hot(torch.tensor(1), 3)
    assert torch.allclose(logits.grad[0], expected, atol=1e-6)


def test_both_terms_off_is_an_error_naming_the_keys():
    with pytest.raises(ValueError, match="stage.alpha=0.0 and stage.rank_weight=0.0"):
        rglf_loss(torch.tensor([LOGITS]), torch.tensor([FEEDBACK]), alpha=0.0, rank_weight=0.0)
