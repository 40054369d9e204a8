"""FocusLLaVA's text-guided sampler: Eq. 8 scores, Eq. 9 selection, layer plans, the pruned forward."""

import pytest
import torch
from tiny_batches import LEVELS, select_rows

from avglab.core.builders import tiny_llava
from avglab.focus.model import FocusCore
from avglab.focus.regions import FocusConfigError
from avglab.focus.text_sampler import (
    TextPlan,
    TextSampler,
    compact,
    resolve_layer,
    score_from_attention,
    select_by_gamma,
    visual_attention_scores,
)


def test_cumulative_gamma_selection_on_a_hand_built_attention_map():
    # 1 sample, 2 heads, 2 text queries, 8 keys: keys 1..5 are visual.
    probs = torch.zeros(1, 2, 2, 8)
    probs[0, 0, 0, 1:6] = torch.tensor([0.40, 0.10, 0.05, 0.05, 0.00])
    probs[0, 1, 0, 1:6] = torch.tensor([0.10, 0.30, 0.05, 0.05, 0.10])
    probs[0, 0, 1, 1:6] = torch.tensor([0.20, 0.10, 0.02, 0.02, 0.06])
    probs[0, 1, 1, 1:6] = torch.tensor([0.00, 0.10, 0.30, 0.02, 0.02])
    visual = torch.zeros(1, 8, dtype=torch.bool)
    visual[0, 1:6] = True
    score = score_from_attention(probs, torch.ones(1, 2, dtype=torch.bool), visual)
    # max over heads: q0 -> .40 .30 .05 .05 .10 ; q1 -> .20 .10 .30 .02 .06 ; mean -> .30 .20 .175 .035 .08
    torch.testing.assert_close(score[0, 1:6], torch.tensor([0.30, 0.20, 0.175, 0.035, 0.08]))
    assert score[0, 0] == 0 and score[0, 6:].abs().sum() == 0
    # normalised (sum .79): .380 .253 .222 .101 .044 by rank -> cumulative .380 .633 .854 .956 1
    keep = select_by_gamma(score, visual, torch.tensor([0.85]))
    assert keep[0].nonzero()[:, 0].tolist() == [1, 2, 3]  # the mass before rank 3 is .633 <= .85
    keep = select_by_gamma(score, visual, torch.tensor([0.86]))
    assert keep[0].nonzero()[:, 0].tolist() == [1, 2, 3, 5]  # .854 <= .86: one more token
    keep = select_by_gamma(score, visual, torch.tensor([0.3]))
    assert keep[0].nonzero()[:, 0].tolist() == [1]
    assert select_by_gamma(score, visual, torch.tensor([1.0]))[0].tolist() == visual[0].tolist()
    padded = score_from_attention(probs, torch.tensor([[True, False]]), visual)  # only query 0
    torch.testing.assert_close(padded[0, 1:6], torch.tensor([0.40, 0.30, 0.05, 0.05, 0.10]))


def test_samples_without_a_query_keep_everything():
    visual = torch.tensor([[False, True, True, True]])
    keep = select_by_gamma(torch.zeros(1, 4), visual, torch.tensor([0.5]))
    assert keep.tolist() == visual.tolist()


def test_scores_equal_eq8_on_transformers_eager_attention():
    model = tiny_llava(vocab_size=60, image_token_id=5, seed=1)
    model.set_attn_implementation("eager")
    lm = model.model.language_model
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 12, 128, generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 10:] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    visual = torch.zeros(2, 12, dtype=torch.bool)
    visual[:, 2:7] = True
    query = torch.zeros(2, 12, dtype=torch.bool)
    query[0, 7:11] = True
    query[1, 8:10] = True
    with torch.no_grad():
        attn = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_attentions=True)
        pe = lm.rotary_emb(embeds, position_ids=positions)
        ours = visual_attention_scores(lm.layers[0], embeds, pe, mask, query, visual)
    probs = attn.attentions[0]  # (B, H, S, S) of layer 1
    for b in range(2):
        rows = query[b].nonzero()[:, 0]
        expected = probs[b][:, rows].amax(0).mean(0) * visual[b]
        torch.testing.assert_close(ours[b], expected, atol=1e-6, rtol=1e-5)


def test_layers_resolve_from_fractions_or_absolute_values():
    assert resolve_layer(0.25, 32, "k") == 8 and resolve_layer(0.75, 32, "k") == 24
    assert resolve_layer(0.25, 2, "k") == 1 and resolve_layer(0.75, 2, "k") == 1
    assert resolve_layer(3, 4, "k") == 3
    with pytest.raises(FocusConfigError, match="focus.text.layer_range"):
        TextSampler(2, layer=1, layer_range=[1, 2])
    with pytest.raises(FocusConfigError, match="focus.text.gamma"):
        TextSampler(2, layer=1, gamma=1.5)
    sampler = TextSampler(32, layer=0.25, layer_range=[0.25, 0.75], gamma_range=[0.7, 0.95]).train()
    plan = sampler.plan(200)
    assert plan.layer.min() >= 8 and plan.layer.max() <= 24 and len(plan.layer.unique()) > 5
    assert plan.gamma.min() >= 0.7 and plan.gamma.max() <= 0.95
    fixed = sampler.eval().plan(3)
    assert fixed.layer.tolist() == [8, 8, 8] and torch.allclose(fixed.gamma, torch.full((3,), 0.85))


def test_compact_keeps_order_on_either_side():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, mask = compact(keep, "right")
    assert index.tolist() == [[0, 2, 3], [1, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    index, mask = compact(keep, "left")
    assert index.tolist() == [[0, 2, 3], [0, 0, 1]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def focus(llava, gamma, stochastic=False):
    text = TextSampler(
        2, layer=1, gamma=gamma, layer_range=[1, 1], gamma_range=[0.5, 0.9], stochastic=stochastic
    )
    return FocusCore(llava, LEVELS, vision=None, text=text).eval()


def test_no_pruning_reproduces_the_plain_forward(llava, batch):
    with torch.no_grad():
        ours = focus(llava, gamma=1.0)(batch, return_logits=True)
        plain = FocusCore(llava, LEVELS).eval()(batch, return_logits=True)
    assert ours.removed.sum() == 0
    valid = plain.spliced.attention_mask.bool()
    torch.testing.assert_close(ours.logits[valid], plain.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.answer_logprob, plain.answer_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.equivalent_tokens, plain.visual_tokens.float())


def test_pruning_counts_and_batch_independence(llava, batch):
    core = focus(llava, gamma=0.5)
    with torch.no_grad():
        together = core(batch)
        assert (together.removed > 0).all() and (together.text_layer == 1).all()
        m, n = together.visual_tokens.float(), together.removed.float()
        torch.testing.assert_close(together.equivalent_tokens, m - n + 1 * n / 2)
        for i in range(len(together.removed)):
            alone = core(select_rows(batch, [i]))
            assert alone.removed[0] == together.removed[i]
            torch.testing.assert_close(
                alone.answer_logprob[0], together.answer_logprob[i], atol=1e-5, rtol=1e-5
            )


def test_stochastic_plans_prune_different_samples_at_different_gammas(llava, batch):
    core = focus(llava, gamma=0.85, stochastic=True).train()
    torch.manual_seed(0)
    with torch.no_grad():
        plan = core.text.plan(4)
        assert len(plan.gamma.unique()) == 4
        spliced = core.splice(
            batch["input_ids"],
            batch["attention_mask"],
            core.sample_visual(
                *core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"]),
                batch["image_sizes"],
                batch["has_image"],
            )[0],
            batch["labels"],
        )
        low = core.prune_forward(
            spliced, batch["instruction_mask"], TextPlan(plan.layer, torch.full((4,), 0.3))
        )
        high = core.prune_forward(
            spliced, batch["instruction_mask"], TextPlan(plan.layer, torch.full((4,), 0.9))
        )
    assert (low.removed > high.removed).all()
    assert (low.labels != -100).sum() == (batch["labels"] != -100).sum()  # pruning never drops an answer
