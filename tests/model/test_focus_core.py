"""FocusCore end to end: generation with a pruned KV cache, gradients and training of the selector."""

import lightning as L
import torch
from omegaconf import OmegaConf
from tiny_batches import IMAGE_ID, LEVELS, PAD_ID, VOCAB
from torch.utils.data import DataLoader

from avglab.core.builders import tiny_llava
from avglab.core.generation import greedy_generate
from avglab.focus.model import FOCUS_LEVEL, FocusCore
from avglab.focus.text_sampler import TextPlan, TextSampler
from avglab.focus.vision_sampler import VisionSampler
from avglab.stages.focus import FocusStage

PROMPT = 10  # conftest prompts: <image> at 3, instruction at 4..8


def both(llava, gamma=0.6, stochastic=False):
    text = TextSampler(
        2, layer=1, gamma=gamma, layer_range=[1, 1], gamma_range=[0.5, 0.9], stochastic=stochastic
    )
    torch.manual_seed(0)
    return FocusCore(llava, LEVELS, vision=VisionSampler(128, 8, 4), text=text)


def prompt_of(core, batch):
    tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
    visual, _ = core.sample_visual(tiles, owner, batch["image_sizes"], batch["has_image"])
    return core.splice(batch["prompt_input_ids"], batch["prompt_attention_mask"], visual, padding_side="left")


def test_generation_equals_a_forward_that_drops_the_same_tokens(llava, batch):
    core = both(llava).eval()
    steps = 5
    with torch.no_grad():
        prompt = prompt_of(core, batch)
        gen = core.generate_greedy(prompt, batch, steps, eos_token_id=-1, keep_logits=True)
        state = core.prune_forward(prompt, batch["instruction_mask"][:, :PROMPT], padding_side="left")
        assert (state.removed > 0).all() and (gen.removed == state.removed).all()
        # Teacher-forced pass over prompt + generated tokens that drops the same visual tokens after layer 1.
        size, fed = len(gen.tokens), gen.tokens[:, :-1]
        embeds = torch.cat([prompt.embeds, core.llava.get_input_embeddings()(fed)], dim=1)
        mask = torch.cat([prompt.attention_mask, torch.ones_like(fed)], dim=1)
        positions = torch.cat(
            [prompt.position_ids, prompt.position_ids[:, -1:] + torch.arange(1, steps)], dim=1
        )
        none = torch.zeros_like(fed, dtype=torch.bool)
        reference = core.pruned_lm.forward(
            embeds,
            mask,
            positions,
            torch.cat([prompt.visual_mask, none], dim=1),
            torch.zeros_like(mask, dtype=torch.bool),
            TextPlan(torch.ones(size, dtype=torch.long), torch.ones(size)),
            padding_side="left",
            forced_keep=torch.cat([state.kept_visual, none], dim=1),
        )
        logits = core.llava.lm_head(reference.hidden[:, -steps:])
    assert (reference.removed == state.removed).all()
    torch.testing.assert_close(logits, gen.logits, atol=1e-5, rtol=1e-5)
    assert (logits.argmax(-1) == gen.tokens).all()
    m, n = prompt.visual_mask.sum(1).float(), state.removed.float()
    torch.testing.assert_close(gen.equivalent_tokens, m - n + n / 2)


def test_generation_without_pruning_equals_transformers_decoding(llava, batch):
    core = both(llava, gamma=1.0).eval()
    with torch.no_grad():
        prompt = prompt_of(core, batch)
        ours = core.generate_greedy(prompt, batch, 6, eos_token_id=-1)
        ref = greedy_generate(core, prompt, 6, eos_token_id=-1)
    assert (ours.removed == 0).all()
    assert torch.equal(ours.tokens, ref.tokens)


def test_evaluation_levels_pick_the_samplers_or_fixed_pooling(llava, batch):
    core = both(llava).eval()
    with torch.no_grad():
        encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        levels, logits = core.select(encoded, batch)
        assert logits is None and (levels == FOCUS_LEVEL).all()
        sampled = core.pack(encoded, batch["image_sizes"], levels)
        fixed = core.pack(encoded, batch["image_sizes"], torch.zeros_like(levels))
        counts = core.token_counts(batch["image_sizes"], batch["has_image"])
    assert [len(v) for v in fixed] == counts[:, 0].tolist()
    assert all(len(v) > 64 for v in sampled)  # global view + sampled local map + newlines


def test_gradients_reach_the_selector_through_the_answer_loss_alone(batch):
    llava = tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0)
    core = both(llava, stochastic=True).train()
    out = core(batch)
    out.loss.backward()  # Eq. 2's Top1 scaling: no balance loss needed for a gradient
    assert core.vision.fc.weight.grad.abs().sum() > 0
    assert out.balance_loss.requires_grad and out.balance_loss > 0


def test_training_a_few_steps_changes_the_selector(batch):
    llava = tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0)
    core = both(llava, stochastic=True)
    stage = OmegaConf.create(
        {
            "name": "focus",
            "train": ["projector", "newline", "llm", "router"],
            "lr": 1e-3,
            "lr_vision": None,
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
        }
    )
    module = FocusStage(core, stage)
    module.train()  # as run.py does: builders return eval-mode models
    before = {k: v.clone() for k, v in core.vision.state_dict().items()}
    llm_before = core.llava.lm_head.weight.clone()
    vision_before = core.llava.model.vision_tower.embeddings.patch_embedding.weight.clone()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader([batch] * 3, batch_size=None))
    after = core.vision.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(llm_before, core.llava.lm_head.weight)
    assert torch.equal(
        vision_before, core.llava.model.vision_tower.embeddings.patch_embedding.weight
    )  # frozen
    assert "train/branch_share_1x1" in trainer.callback_metrics
    assert "train/visual_tokens_equivalent_mean" in trainer.callback_metrics
