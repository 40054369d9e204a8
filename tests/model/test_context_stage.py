"""Stage 1's vision-side context objective (``avglab.stages.context``): targets, mask, gradient path."""

import pytest
import torch
from omegaconf import OmegaConf
from stage_config import compose_config
from tiny_batches import IMAGE_ID, LEVELS, PAD_ID, VOCAB

from avglab.core.builders import tiny_llava
from avglab.core.model import AvgCore
from avglab.stages.context import ContextPretrainStage, context_targets


@pytest.fixture
def fresh():
    """A model of its own: the stage hooks its vision tower, the session ``llava`` stays untouched."""
    return tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0)


def test_targets_hold_each_patch_neighbourhood_and_mask_the_outside():
    pixels = torch.zeros(1, 3, 16, 16)  # a 4x4 grid of 4-px patches
    pixels[0, 0, 4:8, 8:12] = 1.0  # patch (1, 2), channel 0
    targets, mask = context_targets(pixels, patch=4, radius=1, cell=2)
    assert targets.shape == (1, 16, 3 * 6 * 6) and mask.shape == (1, 16, 6 * 6)
    window = targets.unflatten(-1, (3, 6, 6))
    centre = window[0, 1 * 4 + 1]  # patch (1, 1): its right neighbour is lit
    expected = torch.zeros(3, 6, 6)
    expected[0, 2:4, 4:6] = 1.0
    assert torch.equal(centre, expected)
    assert torch.equal(window[0, 1 * 4 + 3][0, 2:4, 0:2], torch.ones(2, 2))  # patch (1, 3): its left one
    assert window[0, 3 * 4 + 0].abs().sum() == 0  # patch (3, 0) is two patches away from it
    corner = mask[0, 0].view(6, 6)  # patch (0, 0): the row above and the column left lie outside
    assert corner[:2].sum() == 0 and corner[:, :2].sum() == 0 and corner[2:, 2:].sum() == 16
    assert mask[0, 5].sum() == 36  # an inner patch sees its whole window


def stage_for(
    llava, weight: float, cell: int = 4, mask: float = 0.0, radius: int = 1
) -> ContextPretrainStage:
    stage = compose_config("stage=pretrain").stage
    OmegaConf.set_struct(stage, False)
    stage.train = ["vision", "projector", "newline", "llm"]
    stage.context_weight, stage.context_radius, stage.context_cell = weight, radius, cell
    stage.context_mask = mask
    return ContextPretrainStage(AvgCore(llava, LEVELS), stage)


def test_context_loss_trains_the_tower_and_weight_zero_is_stage_one(fresh, batch):
    stage = stage_for(fresh, 1.0)
    stage.core(batch, level=-1)
    loss = stage.context_loss()
    assert loss is not None and loss.item() > 0
    loss.backward()
    tower = stage.core.llava.model.vision_tower
    position = getattr(tower, "vision_model", tower).embeddings.position_embedding.weight
    assert position.grad is not None and position.grad.abs().sum() > 0  # the tokens' places are trained too
    assert stage.context_loss() is None  # one forward, one loss
    off = stage_for(tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0), 0.0)
    off.core(batch, level=-1)
    assert off.context_loss() is None


def test_a_cell_that_does_not_divide_the_patch_is_refused(fresh):
    with pytest.raises(ValueError, match="context_cell=3"):
        stage_for(fresh, 1.0, cell=3)


def test_the_masked_form_scores_only_blanked_patches_from_a_second_tower_pass(fresh, batch):
    stage = stage_for(fresh, 1.0, cell=2, mask=0.5, radius=0)
    stage.core(batch, level=-1)
    pixels = stage._seen["pixels"]
    torch.manual_seed(0)
    tokens, hidden = stage.masked_tokens(pixels)
    assert stage._seen["pixels"] is pixels  # the masked pass is not taken for the model's own forward
    assert tokens.shape[:2] == hidden.shape and 0.3 < hidden.mean() < 0.7
    assert not torch.allclose(tokens, stage._seen["tokens"])  # blanked patches change what the tower sees
    torch.manual_seed(0)
    loss = stage.context_loss()
    loss.backward()
    head = stage.context_head.weight.grad
    assert loss.item() > 0 and head is not None and head.abs().sum() > 0
    # scored on the blanked tokens only: the same loss by hand
    targets, _ = context_targets(pixels.detach(), stage.patch, 0, 2)
    error = (stage.context_head(tokens) - targets).pow(2).mean(-1)
    assert torch.allclose(loss, (error * hidden).sum() / hidden.sum(), rtol=1e-4)


def test_a_mask_ratio_outside_zero_to_one_is_refused(fresh):
    with pytest.raises(ValueError, match="context_mask=1.0"):
        stage_for(fresh, 1.0, mask=1.0)


def test_the_head_trains_on_the_stage_schedule_and_only_while_the_objective_is_on(fresh):
    from types import SimpleNamespace

    def groups(stage):
        stage._trainer = SimpleNamespace(estimated_stepping_batches=100)  # all configure_optimizers reads
        config = stage.configure_optimizers()
        scheduler = config["lr_scheduler"]["scheduler"]
        assert len(scheduler.base_lrs) == len(config["optimizer"].param_groups)  # every group scheduled
        return {g["name"]: g for g in config["optimizer"].param_groups}

    stage = stage_for(fresh, 1.0)
    head = groups(stage)["context_head"]
    assert head["initial_lr"] == stage.stage.lr and head["weight_decay"] == 0.0
    assert head["lr"] == 0.0  # the schedule's warm-up starts it from 0, as every other group
    assert {id(p) for p in head["params"]} == {id(p) for p in stage.context_head.parameters()}
    off = tiny_llava(vocab_size=VOCAB, image_token_id=IMAGE_ID, pad_token_id=PAD_ID, seed=0)
    assert "context_head" not in groups(stage_for(off, 0.0))
