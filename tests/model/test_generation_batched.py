"""Batched greedy generation with left padding gives the batch-size-1 predictions."""

import torch
from tiny_batches import LEVELS, SIZES, make_batch

from avglab.core.generation import greedy_generate
from avglab.core.model import AvgCore


def prompts_of(core, batch, levels, lengths, rows):
    """Left-padded spliced prompts of ``rows``, each cut to its own prompt length, at its own level."""
    encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    visual = core.pack(encoded, batch["image_sizes"], torch.tensor(levels))
    ids = torch.zeros(len(rows), max(lengths[r] for r in rows), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, r in enumerate(rows):
        ids[j, : lengths[r]] = batch["prompt_input_ids"][r, : lengths[r]]
        mask[j, : lengths[r]] = 1
    return core.splice(ids, mask, [visual[r] for r in rows], padding_side="left")


def last_logits(core, prompt):
    """The LLM's next-token logits after each row of a spliced ``prompt`` (one forward, no grad)."""
    with torch.no_grad():
        return core.llava(
            inputs_embeds=prompt.embeds,
            attention_mask=prompt.attention_mask,
            position_ids=prompt.position_ids,
            logits_to_keep=1,
        ).logits[:, -1]


def test_left_padded_batch_generates_what_each_sample_generates_alone(llava, image_processor):
    core = AvgCore(llava, LEVELS).eval()
    batch = make_batch(image_processor, SIZES, [20, 16, 18, 13], seed=3)
    levels = [0, 4, 2, 3]  # mixed granularities: visual tokens differ per row
    lengths = [10, 6, 8, 5]  # mixed prompt lengths: the <image> (position 3) stays in every prompt
    rows = list(range(len(SIZES)))
    together = prompts_of(core, batch, levels, lengths, rows)
    assert len(set(together.attention_mask.sum(1).tolist())) == 4  # really four different lengths
    assert (together.attention_mask[:, -1] == 1).all() and (together.attention_mask[:, 0] == 0).any()
    batched = greedy_generate(core, together, max_new_tokens=6, eos_token_id=-1)
    last = last_logits(core, together)
    for r in rows:
        alone = prompts_of(core, batch, levels, lengths, [r])
        single = greedy_generate(core, alone, max_new_tokens=6, eos_token_id=-1)
        assert torch.equal(batched.tokens[r], single.tokens[0]), f"row {r} decodes differently when batched"
        torch.testing.assert_close(last[r], last_logits(core, alone)[0], rtol=1e-4, atol=1e-4)


def test_eos_stops_a_row_without_changing_the_others(llava, image_processor):
    core = AvgCore(llava, LEVELS).eval()
    batch = make_batch(image_processor, SIZES[:2], [20, 16], seed=4)
    prompt = prompts_of(core, batch, [1, 4], [10, 7], [0, 1])
    free = greedy_generate(core, prompt, max_new_tokens=5, eos_token_id=-1)
    eos = int(free.tokens[0, 1])  # row 0's second token becomes its end
    stopped = greedy_generate(core, prompt, max_new_tokens=5, eos_token_id=eos)
    assert (stopped.tokens[0, 1:] == eos).all()
    row1 = free.tokens[1].tolist()
    cut = row1.index(eos) + 1 if eos in row1 else len(row1)
    assert stopped.tokens[1, :cut].tolist() == row1[:cut]
