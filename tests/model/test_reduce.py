"""Training-free reductions (avglab.reduce): exactness, selection rules, KV-cache decoding, batching."""

import pytest
import torch
from tiny_batches import LEVELS, SIZES, make_batch
from transformers import DynamicCache

from avglab.core.decoder_parts import causal_mask, run_layer
from avglab.core.generation import greedy_generate
from avglab.core.model import AvgCore
from avglab.reduce.accounting import layered_prefill_flops, relative_prefill_flops
from avglab.reduce.base import ReduceConfigError
from avglab.reduce.build import attach, build_reduction, build_reductions
from avglab.reduce.fastv import FastV, layer_with_received_attention, received, received_attention, top_visual
from avglab.reduce.llm_pruning import LayerPrunedLM
from avglab.reduce.prumerge_plus import keep_newlines, merge_tokens, select_tokens
from avglab.tools.bench.flops import prefill_flops

FINEST = len(LEVELS) - 1


@pytest.fixture
def core(llava):
    core = AvgCore(llava, LEVELS).eval()
    yield core
    core.reduction = None


def prompts(core, batch, levels, lengths, rows):
    """Left-padded spliced prompts of ``rows``, each cut to its own length, at its own level."""
    with torch.no_grad():
        encoded = core.encode(
            batch["pixel_values"][rows], batch["image_sizes"][rows], batch["has_image"][rows]
        )
        visual = core.pack(encoded, batch["image_sizes"][rows], torch.tensor([levels[r] for r in rows]))
    ids = torch.zeros(len(rows), max(lengths[r] for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, : lengths[r]] = batch["prompt_input_ids"][r, : lengths[r]]
        mask[j, : lengths[r]] = 1
    return core.splice(ids, mask, visual, padding_side="left")


@pytest.mark.parametrize("spec", [{"name": "fastv", "layer": 1, "keep": 1.0}, {"name": "vtw", "layer": 2}])
def test_keeping_everything_gives_the_unreduced_logits_and_answers(core, batch, spec):
    with torch.no_grad():
        plain = core(batch, level=FINEST, return_logits=True)
        prompt = prompts(core, batch, [FINEST] * 4, [10, 7, 9, 6], [0, 1, 2, 3])
        answers = greedy_generate(core, prompt, 4, -1).tokens
        attach(core, spec)
        reduced = core(batch, level=FINEST, return_logits=True)
        prompt = prompts(core, batch, [FINEST] * 4, [10, 7, 9, 6], [0, 1, 2, 3])
        generated = greedy_generate(core, prompt, 4, -1)
    real = plain.spliced.attention_mask.bool()
    assert torch.equal(reduced.logits[real], plain.logits[real])
    assert torch.equal(reduced.loss, plain.loss)
    assert torch.equal(generated.tokens, answers)
    assert (generated.visual_tokens_per_layer == prompt.visual_mask.sum(1, keepdim=True)).all()


def test_pruning_changes_the_answer_scores_and_counts_tokens_per_layer(core, batch):
    with torch.no_grad():
        plain = core(batch, level=FINEST)
        attach(core, {"name": "vtw", "layer": 1})
        withdrawn = core(batch, level=FINEST)
        prompt = prompts(core, batch, [FINEST] * 2, [10, 7], [0, 1])
        generated = greedy_generate(core, prompt, 3, -1)
    assert not torch.equal(withdrawn.answer_logprob, plain.answer_logprob)
    visual = prompt.visual_mask.sum(1)
    assert generated.visual_tokens_per_layer.tolist() == [[int(v), 0] for v in visual]
    assert torch.allclose(generated.equivalent_tokens, visual.float() / 2)


def test_fastv_keeps_the_tokens_with_the_most_attention_on_a_hand_built_map():
    # 1 sample, 2 heads, 3 queries over 6 keys; keys 1..4 are visual
    probs = torch.zeros(1, 2, 3, 6)
    probs[0, 0, :, 2] = 0.6  # key 2: 0.3 on average over heads
    probs[0, 1, :, 4] = 0.8  # key 4: 0.4
    probs[0, :, :, 3] = 0.1  # key 3: 0.1
    probs[0, :, 0, 1] = 0.9  # key 1: 0.3 from one query -> 0.1 over the three
    probs[0, :, :, 5] = 0.95  # key 5: most attention, but text: never kept
    scores = received(probs, torch.ones(1, 3, dtype=torch.bool))
    visual = torch.tensor([[False, True, True, True, True, False]])
    assert top_visual(scores, visual, 0.5).nonzero()[:, 1].tolist() == [2, 4]
    assert top_visual(scores, visual, 0.25).nonzero()[:, 1].tolist() == [4]
    assert top_visual(scores, visual, 1.0).equal(visual)
    # ties keep the earlier token (keys 1 and 3 both score 0.1)
    assert top_visual(scores, visual, 0.75).nonzero()[:, 1].tolist() == [1, 2, 4]


def test_the_one_layer_attention_is_the_eager_attention_of_that_layer(core, batch):
    prompt = prompts(core, batch, [2, 3], [10, 7], [0, 1])  # left-padded: padding masked too
    lm = core.llava.model.language_model
    core.llava.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = lm(
                inputs_embeds=prompt.embeds,
                attention_mask=prompt.attention_mask,
                position_ids=prompt.position_ids,
                output_attentions=True,
                output_hidden_states=True,
            )
    finally:
        core.llava.set_attn_implementation("sdpa")
    with torch.no_grad():
        pe = lm.rotary_emb(prompt.embeds, position_ids=prompt.position_ids)
        ours = received_attention(lm.layers[1], out.hidden_states[1], pe, prompt.attention_mask)
        ours_last = received_attention(lm.layers[1], out.hidden_states[1], pe, prompt.attention_mask, True)
    eager = received(out.attentions[1], prompt.attention_mask.bool())
    real = prompt.attention_mask.bool()
    torch.testing.assert_close(ours[real], eager[real], rtol=1e-4, atol=1e-6)
    last = torch.zeros_like(real)
    last[:, -1] = True  # left padding: every row's last real token is the last position
    torch.testing.assert_close(ours_last[real], received(out.attentions[1], last)[real], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("last_only", [False, True], ids=["mean", "last"])
def test_layer_k_runs_once_for_its_output_and_the_score(core, batch, last_only):
    prompt = prompts(core, batch, [2, 3], [10, 7], [0, 1])  # left-padded
    lm = core.llava.model.language_model
    real = prompt.attention_mask.bool()
    with torch.no_grad():
        pe = lm.rotary_emb(prompt.embeds, position_ids=prompt.position_ids)
        causal = causal_mask(lm, prompt.embeds, prompt.attention_mask, prompt.position_ids, None, 0)
        hidden = run_layer(lm.layers[0], prompt.embeds, causal, prompt.position_ids, pe, None)
        plain_cache, fused_cache = DynamicCache(config=lm.config), DynamicCache(config=lm.config)
        heads, width = lm.config.num_key_value_heads, lm.config.hidden_size // lm.config.num_attention_heads
        for cache in (plain_cache, fused_cache):  # layer 0's slot, so that layer 1 writes slot 1
            cache.update(*(torch.zeros(2, heads, 0, width) for _ in range(2)), 0)
        mask = causal_mask(lm, hidden, prompt.attention_mask, prompt.position_ids, plain_cache, 1)
        expected = run_layer(lm.layers[1], hidden, mask, prompt.position_ids, pe, plain_cache)
        score = received_attention(lm.layers[1], hidden, pe, prompt.attention_mask, last_only)
        output, fused_score = layer_with_received_attention(
            lm.layers[1], hidden, pe, prompt.attention_mask, fused_cache, last_only
        )
    torch.testing.assert_close(output[real], expected[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_score, score, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fused_cache.layers[1].keys, plain_cache.layers[1].keys)
    torch.testing.assert_close(fused_cache.layers[1].values, plain_cache.layers[1].values)


def test_fastv_prunes_the_same_tokens_with_layer_k_fused(core, batch):
    reduction = attach(core, {"name": "fastv", "layer": 1, "keep": 0.25})
    prompt = prompts(core, batch, [4, 3, 2], [10, 7, 9], [0, 1, 2])
    lm = core.llava.model.language_model
    fused, separate = reduction.pruned_lm(core), LayerPrunedLM(lm, 1, reduction.choose)
    with torch.no_grad():
        runs = [
            pruned.forward(
                prompt.embeds, prompt.attention_mask, prompt.position_ids, prompt.visual_mask, None, "left"
            )
            for pruned in (fused, separate)
        ]
    assert torch.equal(runs[0].index, runs[1].index) and torch.equal(runs[0].mask, runs[1].mask)
    real = runs[0].mask.bool()
    torch.testing.assert_close(runs[0].hidden[real], runs[1].hidden[real], rtol=1e-5, atol=1e-5)


def test_pruned_positions_stay_pruned_while_decoding_with_the_cache(core, batch):
    reduction = attach(core, {"name": "fastv", "layer": 1, "keep": 0.25})
    prompt = prompts(core, batch, [FINEST], [10], [0])
    lm, head, embed = core.llava.model.language_model, core.llava.lm_head, core.llava.get_input_embeddings()
    cache = DynamicCache(config=lm.config)
    steps = reduction.stepper(core, prompt)
    with torch.no_grad():
        hidden = steps(lm, prompt.embeds, None, prompt.position_ids, cache)
        tokens, position = [head(hidden).argmax(-1)], prompt.position_ids[:, -1:]
        for _ in range(3):
            position = position + 1
            tokens.append(head(steps(lm, embed(tokens[-1][:, None]), None, position, cache)).argmax(-1))
    length, visual = prompt.embeds.shape[1], int(prompt.visual_mask.sum())
    kept = round(visual * 0.25)
    assert cache.layers[0].keys.shape[-2] == length + 3  # layer 1 saw every token, then 3 decoded ones
    assert cache.layers[1].keys.shape[-2] == length - visual + kept + 3  # layer 2: the kept ones only
    # the same tokens without any cache: the whole sequence re-run with the prefill's tokens pruned
    kept_mask = torch.zeros(1, length + 3, dtype=torch.bool)
    kept_mask[0, steps.run.index[0]] = True
    sequence = torch.cat([prompt.embeds, embed(torch.stack(tokens[:-1], 1))], 1)
    visual_mask = torch.cat([prompt.visual_mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    forced = LayerPrunedLM(lm, 1, lambda layer, hidden, pe, mask, vis: kept_mask & vis)
    with torch.no_grad():
        run = forced.forward(
            sequence, torch.ones(1, length + 3, dtype=torch.long), torch.arange(length + 3)[None], visual_mask
        )
        again = head(run.hidden[:, -4:]).argmax(-1)
        generated = greedy_generate(core, prompt, 4, -1).tokens
    assert again[0].tolist() == [int(t) for t in tokens]
    assert generated[0].tolist() == [int(t) for t in tokens]


@pytest.mark.parametrize(
    "spec",
    [{"name": "fastv", "layer": 1, "keep": 0.5}, {"name": "vtw", "layer": 1}, {"name": "prumerge_plus"}],
    ids=["fastv", "vtw", "prumerge_plus"],
)
def test_left_padded_batches_answer_as_each_sample_alone(core, image_processor, spec):
    attach(core, spec)
    batch = make_batch(image_processor, SIZES, [20, 16, 18, 13], seed=3)
    levels, lengths, rows = [0, 4, 2, 3], [10, 6, 8, 5], [0, 1, 2, 3]
    together = greedy_generate(core, prompts(core, batch, levels, lengths, rows), 5, -1)
    for r in rows:
        alone = greedy_generate(core, prompts(core, batch, levels, lengths, [r]), 5, -1)
        assert torch.equal(together.tokens[r], alone.tokens[0]), f"row {r} answers differently in the batch"


def test_prumerge_plus_keeps_iqr_outliers_and_uniform_samples():
    scores = torch.full((16,), 0.01)
    scores[[5, 9]] = torch.tensor([0.5, 0.3])  # the two outliers
    kept = select_tokens(scores, None)
    # ratio 2/16: step int(1/ratio) = 8, uniform samples from 8 // 6 = 1 every 8 // 3 = 2 below 15
    assert kept.nonzero()[:, 0].tolist() == sorted({5, 9} | set(range(1, 15, 2)))
    budget = select_tokens(scores, 0.25)  # 4 tokens: the top one and 3 spread over the rest
    assert int(budget.sum()) == 4 and bool(budget[5])


def test_prumerge_plus_merges_the_key_nearest_tokens_weighted_by_cls_attention():
    features = torch.eye(4)
    keys = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    scores = torch.tensor([0.4, 0.1, 0.3, 0.2])
    kept = torch.tensor([True, False, True, False])
    merged = merge_tokens(features, scores, keys, kept, neighbours=1)
    # token 0 absorbs its key neighbour 1 (weight 0.1), token 2 its neighbour 3 (weight 0.2)
    torch.testing.assert_close(merged[0], torch.tensor([1.0, 0.1, 0.0, 0.0]))
    torch.testing.assert_close(merged[2], torch.tensor([0.0, 0.0, 1.0, 0.2]))
    assert torch.equal(merged[[1, 3]], features[[1, 3]])


def test_prumerge_plus_drops_the_newline_of_an_emptied_row():
    marks = torch.tensor(
        [1, 0, 0, 0, 1, 0, 2, 0, 0, 2, 0, 1, 2], dtype=torch.float
    )  # base 4, rows of 2+newline
    kept = keep_newlines(marks, base=4)
    assert kept.nonzero()[:, 0].tolist() == [0, 4, 6, 11, 12]


def test_prumerge_plus_keeping_everything_unmerged_packs_as_without_it(core, batch):
    with torch.no_grad():
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        plain = core.pack(encoded, batch["image_sizes"], torch.tensor([4, 3, 2, 0]))
        attach(core, {"name": "prumerge_plus", "keep": 1.0, "neighbours": 0})
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        same = core.pack(encoded, batch["image_sizes"], torch.tensor([4, 3, 2, 0]))
        attach(core, {"name": "prumerge_plus"})
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        fewer = core.pack(encoded, batch["image_sizes"], torch.tensor([4, 3, 2, 0]))
    assert all(torch.equal(a, b) for a, b in zip(plain, same, strict=True))
    assert all(len(f) < len(p) for f, p in zip(fewer, plain, strict=True))


def test_layered_flops_add_up_per_layer_and_prune_in_proportion(llava):
    config = llava.config.text_config
    assert config.num_hidden_layers == 2  # the bench's count is the layered count at one length
    assert layered_prefill_flops(config, [300, 300]) == pytest.approx(prefill_flops(config, 300))
    # each layer adds its own length's cost: layer 2's 100 tokens cost the same beside 300 or beside 0
    second = layered_prefill_flops(config, [300, 100]) - layered_prefill_flops(config, [300, 0])
    assert second == pytest.approx(
        layered_prefill_flops(config, [0, 100]) - layered_prefill_flops(config, [0, 0])
    )
    assert layered_prefill_flops(config, [300, 100]) < layered_prefill_flops(config, [300, 300])
    assert relative_prefill_flops(config, 20, [280, 280], 280) == 1.0
    halfway = relative_prefill_flops(config, 20, [280, 0], 280)
    assert 0.5 < halfway < 0.6  # layer 2 sees 20 of 300 tokens


def test_bad_settings_fail_naming_the_key():
    with pytest.raises(ReduceConfigError, match="reduce.layer"):
        build_reduction({"name": "fastv", "layer": 3}, depth=2)
    with pytest.raises(ReduceConfigError, match="unknown keys"):
        build_reduction({"name": "vtw", "keep": 0.5}, depth=2)
    with pytest.raises(ReduceConfigError, match="reduce.keep"):
        build_reduction({"name": "fastv", "keep": 1.5}, depth=2)
    assert build_reduction("none", depth=2) is None
    assert isinstance(build_reduction("fastv", depth=32), FastV) and build_reduction("vtw", 32).layer == 16


def test_compared_reductions_get_one_row_each():
    both = build_reductions(["fastv", {"name": "fastv", "score": "last"}, "none"], depth=4)
    assert list(both) == ["fastv(K=2,keep=0.5)", "fastv(K=2,keep=0.5,score=last)", "none"]
    with pytest.raises(ReduceConfigError, match="listed twice"):
        build_reductions(["vtw", {"name": "vtw", "layer": 2}], depth=4)  # the default layer of 4 is 2


def test_the_router_picks_a_level_then_the_reduction_cuts_it(routed_core, batch):
    with torch.no_grad():
        encoded = routed_core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        levels, _ = routed_core.select(encoded, batch)
        unreduced = routed_core.pack(encoded, batch["image_sizes"], levels)
        attach(routed_core, {"name": "fastv", "layer": 1, "keep": 0.5})
        try:
            routed = routed_core(batch)
            prompt = routed_core.splice(
                batch["prompt_input_ids"], batch["prompt_attention_mask"], unreduced, padding_side="left"
            )
            per_layer = greedy_generate(routed_core, prompt, 2, -1).visual_tokens_per_layer
        finally:
            routed_core.reduction = None
    assert torch.equal(routed.levels, levels)  # the router's choice is untouched
    first = torch.tensor([len(v) for v in unreduced])
    assert torch.equal(per_layer[:, 0], first) and torch.equal(per_layer[:, 1], torch.round(first / 2).long())
