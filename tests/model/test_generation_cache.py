"""Greedy decoding's reserved KV cache and masks (issue 21): what HF's DynamicCache computes, without
copying the cache per token, and no attention mask where no row is padded."""

import functools

import torch
from test_generation_batched import prompts_of
from tiny_batches import LEVELS, SIZES, make_batch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from avglab.core.generation import ReservedLayer, greedy_generate, reserved_cache
from avglab.core.model import AvgCore


def test_reserved_layer_returns_what_a_dynamic_layer_returns_without_copying():
    torch.manual_seed(0)
    reserved, dynamic = ReservedLayer(capacity=5), DynamicLayer()
    previous = None
    for step, n in enumerate([3, 1, 1, 4, 1]):  # prompt, two tokens, then past the reserve (it doubles)
        k, v = torch.randn(2, 3, n, 4), torch.randn(2, 3, n, 4)
        keys, values = reserved.update(k, v)
        ref_keys, ref_values = dynamic.update(k, v)
        assert torch.equal(keys, ref_keys) and torch.equal(values, ref_values)
        assert reserved.get_seq_length() == dynamic.get_seq_length()
        assert reserved.get_mask_sizes(1) == dynamic.get_mask_sizes(1)
        assert keys.data_ptr() == reserved.key_buffer.data_ptr()  # a view of the reserved buffer
        if step in (1, 2):  # within the reserve the buffer stays where it is: no per-token copy
            assert reserved.key_buffer.data_ptr() == previous
        previous = reserved.key_buffer.data_ptr()
    assert reserved.capacity == 10


def test_reserved_layer_follows_reset_crop_and_batch_reshuffles_like_a_dynamic_layer():
    torch.manual_seed(1)
    reserved, dynamic = ReservedLayer(capacity=8), DynamicLayer()

    def both(k, v):
        assert all(
            torch.equal(a, b) for a, b in zip(reserved.update(k, v), dynamic.update(k, v), strict=True)
        )

    both(torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4))
    steps = [("crop", -2), ("reorder_cache", torch.tensor([2, 0, 1])), ("batch_repeat_interleave", 2),
             ("batch_select_indices", torch.tensor([5, 1]))]  # fmt: skip
    for operation, argument in steps:
        getattr(reserved, operation)(argument)
        getattr(dynamic, operation)(argument)
        assert torch.equal(reserved.keys, dynamic.keys) and torch.equal(reserved.values, dynamic.values)
        both(torch.randn(len(dynamic.keys), 2, 1, 4), torch.randn(len(dynamic.keys), 2, 1, 4))
    reserved.reset()
    dynamic.reset()
    assert reserved.get_seq_length() == dynamic.get_seq_length() == 0
    both(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4))
    assert reserved.get_seq_length() == 3


def test_reserved_cache_keeps_special_layers_to_transformers(llava):
    config = llava.config.text_config
    assert all(isinstance(layer, ReservedLayer) for layer in reserved_cache(config, 8).layers)
    sliding = config.__class__(**{**config.to_dict(), "layer_types": None, "sliding_window": 4})
    sliding.layer_types = ["sliding_attention"] * config.num_hidden_layers
    cache = reserved_cache(sliding, 8)
    assert isinstance(cache, DynamicCache) and not any(isinstance(x, ReservedLayer) for x in cache.layers)


def test_decoding_equals_transformers_dynamic_cache_decoding(llava, image_processor):
    """Logits of every step equal the LLaVA forward with HF's DynamicCache and a growing mask."""
    core = AvgCore(llava, LEVELS).eval()
    batch = make_batch(image_processor, SIZES, [20, 16, 18, 13], seed=5)
    prompt = prompts_of(core, batch, [0, 4, 2, 3], [10, 6, 8, 5], list(range(len(SIZES))))
    ours = greedy_generate(core, prompt, max_new_tokens=5, eos_token_id=-1)
    with torch.no_grad():
        out = llava(inputs_embeds=prompt.embeds, attention_mask=prompt.attention_mask,
                    position_ids=prompt.position_ids, use_cache=True, logits_to_keep=1)  # fmt: skip
        token, mask, position, ref = (
            out.logits[:, -1].argmax(-1),
            prompt.attention_mask,
            prompt.position_ids[:, -1:],
            [],
        )
        for _ in range(5):
            ref.append(token)
            mask, position = torch.cat([mask, mask.new_ones(len(mask), 1)], 1), position + 1
            out = llava(input_ids=token[:, None], attention_mask=mask, position_ids=position, cache=out.cache,
                        use_cache=True)  # fmt: skip
            token = out.logits[:, -1].argmax(-1)
    assert torch.equal(ours.tokens, torch.stack(ref, 1))


def test_no_mask_without_padding_and_reserved_views_with_padding(llava, image_processor, monkeypatch):
    core = AvgCore(llava, LEVELS).eval()
    language_model = llava.model.language_model
    seen = []
    forward = type(language_model).forward

    @functools.wraps(forward)  # keeps the signature: generation reads the cache keyword off it
    def spy(self, *args, **kwargs):
        seen.append((kwargs["attention_mask"], kwargs["cache"]))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(language_model), "forward", spy)
    batch = make_batch(image_processor, SIZES[:2], [20, 16], seed=6)
    alone = prompts_of(core, batch, [1, 1], [10, 10], [0])
    greedy_generate(core, alone, max_new_tokens=4, eos_token_id=-1)
    assert len(seen) == 4 and all(mask is None for mask, _ in seen)  # SDPA's causal / no-mask path
    assert all(isinstance(layer, ReservedLayer) for layer in seen[0][1].layers)
    seen.clear()
    padded = prompts_of(core, batch, [1, 4], [10, 7], [0, 1])
    length = padded.attention_mask.shape[1]
    greedy_generate(core, padded, max_new_tokens=4, eos_token_id=-1)
    masks = [mask for mask, _ in seen]
    assert [m.shape[1] for m in masks] == [length, length + 1, length + 2, length + 3]
    assert torch.equal(masks[0], padded.attention_mask) and (masks[-1][:, length:] == 1).all()
    assert len({m.data_ptr() for m in masks}) == 1  # views of one reserved mask, none concatenated
