"""RGLF losses (AVG-LLaVA Eqs. 4-9) as pure functions.

Feedback r (B, N) is the frozen LMM's mean answer log-probability at each granularity (Eq. 4).
Router scores are s = log_softmax(router logits). Pairs are ranked by r, best first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RglfLoss:
    """Terms of Eq. 9 and what they were computed on.

    Attributes:
        total: rank_weight * L_rank + alpha * L_ce, averaged over usable samples (0 with a graph if
            none); rank_weight is 1 in the paper, 0 in ablation (f).
        rank: mean over usable samples of the Eq. 5 pair sum.
        ce: mean over samples with a unique best level of Eq. 8.
        usable: (B,) samples with finite feedback (an answer token) and at least one untied pair.
        ce_usable: (B,) samples whose best level is unique.
        best: (B,) argmax_i r_i (the CE target), -1 where unusable.
    """

    total: torch.Tensor
    rank: torch.Tensor
    ce: torch.Tensor
    usable: torch.Tensor
    ce_usable: torch.Tensor
    best: torch.Tensor


TOKEN_COST_SCALES = ("linear", "log2")


def apply_token_cost(
    feedback: torch.Tensor, visual_tokens: torch.Tensor, token_cost: float, scale: str = "linear"
) -> torch.Tensor:
    """r_i - cost * tokens_i (or cost * log2 tokens_i): an optional price on visual tokens (0 = the paper).

    ``linear`` prices each token, i.e. the LLM's compute. ``log2`` prices each doubling of the tokens, the
    same at every level and image size: a level must raise the answer probability by a factor exp(cost)
    per doubling to be worth it.

    Args:
        feedback: (B, N) answer scores (log-probabilities).
        visual_tokens: (B, N) visual tokens each level feeds the LLM (0 for text-only samples).
        token_cost: log-probability per visual token (``linear``) or per doubling (``log2``).
        scale: ``linear`` or ``log2``.
    """
    if scale not in TOKEN_COST_SCALES:
        raise ValueError(f"router.token_cost_scale must be one of {TOKEN_COST_SCALES}, got {scale!r}")
    if token_cost == 0:
        return feedback
    tokens = visual_tokens.to(feedback)
    price = tokens if scale == "linear" else torch.log2(tokens.clamp(min=1))
    return feedback - token_cost * price


def ranking_loss(scores: torch.Tensor, feedback: torch.Tensor, tie_eps: float = 0.0) -> torch.Tensor:
    """Eq. 5 with the Eq. 6 margin, summed over every ordered pair of each sample.

    For levels a, b with r_a > r_b (a ranked i-th, b ranked j-th, i < j):
    max(0, s_b - s_a + (j - i) * (r_a - r_b)). Pairs whose feedback differs by at most ``tie_eps``
    carry no preference and are left out.

    Args:
        scores: (B, N) router log-probabilities s_g.
        feedback: (B, N) finite LMM feedback r_g.
        tie_eps: feedback difference treated as a tie.

    Returns:
        (B,) per-sample pair sums.
    """
    order = feedback.argsort(dim=1, descending=True)  # v^1..v^N
    r = feedback.gather(1, order)  # (B, N) descending
    s = scores.gather(1, order)
    rank = torch.arange(r.shape[1], device=r.device)
    distance = (rank[None, :] - rank[:, None]).to(r)  # [i, j] = j - i
    gap = r[:, :, None] - r[:, None, :]  # [b, i, j] = r_{v^i} - r_{v^j} >= 0 for j > i
    margin = distance * gap  # Eq. 6
    hinge = F.relu(s[:, None, :] - s[:, :, None] + margin)  # [b, i, j] = max(0, s_{v^j} - s_{v^i} + margin)
    pairs = (distance > 0) & (gap > tie_eps)
    return (hinge * pairs).sum(dim=(1, 2))


def rglf_loss(
    router_logits: torch.Tensor,
    feedback: torch.Tensor,
    alpha: float = 0.1,
    tie_eps: float = 0.0,
    rank_weight: float = 1.0,
) -> RglfLoss:
    """L4 = L_rank + alpha * L_ce (Eq. 9) over the samples that carry a preference.

    Table 4's loss ablations are weights of the two terms: (f) without the ranking loss is
    ``rank_weight=0`` (L4 = alpha * L_ce), (g) without the CE loss is ``alpha=0`` (L4 = L_rank).

    Samples whose feedback is NaN (no answer token) or all tied (e.g. text-only) are left out of
    the ranking term; samples whose best level is tied are left out of the CE term (Eq. 8 needs
    one best level). Nothing becomes NaN: with no usable sample the loss is an exact 0.

    Args:
        router_logits: (B, N).
        feedback: (B, N) LMM feedback (after any token cost).
        alpha: weight of the CE term (0.1 in the paper).
        tie_eps: feedback difference treated as a tie.
        rank_weight: weight of the ranking term (1 in Eq. 9).
    """
    if alpha < 0 or rank_weight < 0 or alpha == rank_weight == 0:
        raise ValueError(
            f"stage.alpha={alpha} and stage.rank_weight={rank_weight} must be >= 0 and not both 0"
        )
    finite = torch.isfinite(feedback).all(dim=1)
    safe = torch.where(finite[:, None], feedback, torch.zeros_like(feedback))
    scores = F.log_softmax(router_logits.float(), dim=-1)
    top2 = safe.topk(min(2, safe.shape[1]), dim=1).values
    spread = safe.max(dim=1).values - safe.min(dim=1).values
    usable = finite & (spread > tie_eps)
    ce_usable = usable & ((top2[:, 0] - top2[:, -1]) > tie_eps) if safe.shape[1] > 1 else usable
    best = torch.where(ce_usable, safe.argmax(dim=1), torch.full_like(usable, -1, dtype=torch.long))
    zero = router_logits.sum() * 0.0
    rank = ranking_loss(scores, safe, tie_eps)[usable].mean() if usable.any() else zero
    ce = -scores[ce_usable].gather(1, best[ce_usable, None]).mean() if ce_usable.any() else zero
    return RglfLoss(rank_weight * rank + alpha * ce, rank, ce, usable, ce_usable, best)
