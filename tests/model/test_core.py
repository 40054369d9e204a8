import pytest
import torch
from tiny_batches import IMAGE_ID, LEVELS, make_batch, select_rows
from torch.nn.utils.rnn import pad_sequence

from avglab.core.model import AvgCore
from avglab.core.selector import FixedSelector, RandomSelector


def hf_inputs(batch, visual_tokens):
    """The same batch with each <image> expanded to its visual token count, as HF's processor does."""
    seqs = []
    for i, n in enumerate(visual_tokens.tolist()):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
        p = int((ids == IMAGE_ID).nonzero()[0])
        seqs.append(torch.cat([ids[:p], torch.full((n,), IMAGE_ID), ids[p + 1 :]]))
    ids = pad_sequence(seqs, batch_first=True)
    mask = pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
    return ids, mask


def test_full_granularity_reproduces_hf_llava_next(llava, batch):
    core = AvgCore(llava, LEVELS, selector=None).eval()
    with torch.no_grad():
        ours = core(batch, return_logits=True)
        ids, mask = hf_inputs(batch, ours.visual_tokens)
        ref = llava(
            input_ids=ids,
            attention_mask=mask,
            pixel_values=batch["pixel_values"],
            image_sizes=batch["image_sizes"],
        ).logits
    assert ours.logits.shape == ref.shape
    valid = mask.bool()
    torch.testing.assert_close(ours.logits[valid], ref[valid], atol=1e-5, rtol=1e-5)
    assert (ours.levels == len(LEVELS) - 1).all()


def test_batch_of_four_agrees_with_batch_size_one(routed_core, batch):
    with torch.no_grad():
        together = routed_core(batch)
        for i in range(4):
            alone = routed_core(select_rows(batch, [i]))
            torch.testing.assert_close(
                alone.router_logits[0], together.router_logits[i], atol=1e-5, rtol=1e-5
            )
            assert alone.levels[0] == together.levels[i]
            assert alone.visual_tokens[0] == together.visual_tokens[i]
            torch.testing.assert_close(
                alone.answer_logprob[0], together.answer_logprob[i], atol=1e-5, rtol=1e-5
            )


def test_mixed_granularities_in_one_batch_match_single_runs(llava, batch):
    core = AvgCore(llava, LEVELS, RandomSelector(len(LEVELS), seed=3)).eval()
    with torch.no_grad():
        mixed = core(batch)
        assert len(set(mixed.levels.tolist())) > 1, "the seed should give mixed levels"
        for i in range(4):
            alone = core(select_rows(batch, [i]), level=int(mixed.levels[i]))
            assert alone.visual_tokens[0] == mixed.visual_tokens[i]
            torch.testing.assert_close(alone.answer_logprob[0], mixed.answer_logprob[i], atol=1e-5, rtol=1e-5)


def test_reported_tokens_match_geometry_and_levels(routed_core, batch):
    counts = routed_core.token_counts(batch["image_sizes"], batch["has_image"])
    for level in range(len(LEVELS)):
        out = routed_core(batch, level=level)
        assert out.visual_tokens.tolist() == counts[:, level].tolist()
        assert (out.levels == level).all()
    assert (counts[:, :-1] < counts[:, 1:]).all()  # coarse levels feed fewer tokens


def test_forced_level_does_not_run_the_selector(routed_core, batch):
    calls = []
    handle = routed_core.selector.register_forward_hook(lambda *a: calls.append(1))
    try:
        forced = routed_core(batch, level=-1)
        routed_core(batch)
    finally:
        handle.remove()
    assert len(calls) == 1 and forced.router_logits is None
    assert (forced.levels == len(LEVELS) - 1).all()


def test_right_padding_runs_the_llm_without_a_mask_and_left_padding_with_one(routed_core, batch):
    seen = []
    llm = routed_core.llava.model.language_model
    handle = llm.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True
    )
    encoded = routed_core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    visual = routed_core.pack(encoded, batch["image_sizes"], torch.full((4,), len(LEVELS) - 1))
    try:
        with torch.no_grad():
            for side in ("right", "left"):
                spliced = routed_core.splice(
                    batch["input_ids"], batch["attention_mask"], visual, padding_side=side
                )
                routed_core.hidden_states(spliced)
    finally:
        handle.remove()
    assert seen[0] is None  # causal attention alone never reaches padding placed after the real tokens
    assert seen[1] is not None and not seen[1].bool().all()


def test_all_levels_loss_is_the_mean_of_per_level_losses(routed_core, batch):
    with torch.no_grad():
        scores, n_tokens, loss = routed_core.all_levels(batch)
        per_level = [routed_core(batch, level=lv).loss for lv in range(len(LEVELS))]
        for lv in range(len(LEVELS)):
            single = routed_core(batch, level=lv)
            torch.testing.assert_close(scores[:, lv], single.answer_logprob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, torch.stack(per_level).mean(), atol=1e-5, rtol=1e-5)
    assert n_tokens.tolist() == [10, 6, 8, 3]


def test_all_levels_runs_the_vision_tower_once(routed_core, batch):
    calls = []
    handle = routed_core.llava.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        routed_core.all_levels(batch)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_text_only_sample_gets_no_visual_tokens(routed_core, image_processor):
    batch = make_batch(image_processor, [(64, 128), (128, 128)], [14, 12])
    batch["has_image"][1] = False
    batch["input_ids"][1, 3] = 11  # no placeholder
    with torch.no_grad():
        out = routed_core(batch)
    assert out.levels[1] == -1 and out.visual_tokens[1] == 0 and out.visual_tokens[0] > 0


def test_placeholder_without_image_is_a_clear_error(routed_core, image_processor):
    batch = make_batch(image_processor, [(64, 128)], [14])
    batch["has_image"][0] = False
    with pytest.raises(ValueError, match="placeholder but no image"):
        routed_core(batch)


def test_fixed_selector_picks_its_level(llava, batch):
    core = AvgCore(llava, LEVELS, FixedSelector(len(LEVELS), 1)).eval()
    with torch.no_grad():
        assert core(batch).levels.tolist() == [1, 1, 1, 1]
