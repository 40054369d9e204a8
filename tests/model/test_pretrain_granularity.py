"""Stage 1 at a configured granularity (``stage.granularity``): the level it trains, and a bad value."""

import re

import pytest
import torch
from omegaconf import OmegaConf
from stage_config import compose_config
from tiny_batches import LEVELS

from avglab.core.model import AvgCore
from avglab.stages.pretrain import PretrainStage


def stage_with(llava, granularity, finest_steps: int = 0) -> PretrainStage:
    stage = compose_config("stage=pretrain").stage
    OmegaConf.set_struct(stage, False)
    stage.train, stage.granularity, stage.finest_steps = ["projector"], granularity, finest_steps
    return PretrainStage(AvgCore(llava, LEVELS), stage)


def logged_token_means(stage: PretrainStage, batch, steps: int, monkeypatch) -> list[float]:
    """The visual-token means ``stage`` logs for training steps 0..steps-1, then one validation step."""
    seen = []
    monkeypatch.setattr(stage, "log", lambda name, value, **_: seen.append((name, value.item())))
    for step in range(steps):
        monkeypatch.setattr(PretrainStage, "global_step", property(lambda self, step=step: step))
        stage.answer_output(batch, "train")
    stage.answer_output(batch, "val")
    return [value for name, value in seen if name.endswith("visual_tokens_mean")]


def test_stage_one_feeds_the_configured_granularity_and_the_finest_by_default(llava, batch):
    coarse = stage_with(llava, LEVELS[1])
    assert coarse.level == 1
    tokens = coarse.core(batch, level=coarse.level).visual_tokens
    finest = stage_with(llava, None)
    assert finest.level == -1
    assert (tokens < finest.core(batch, level=finest.level).visual_tokens).all()


def test_a_granularity_the_scaler_lacks_is_refused_with_the_allowed_ones(llava):
    allowed = re.escape(str(LEVELS))
    with pytest.raises(
        ValueError, match=rf"stage.granularity=3: train at one of router.granularities {allowed}"
    ):
        stage_with(llava, 3)


def test_a_list_of_granularities_is_taken_in_turn_and_validated_at_its_finest(llava, batch, monkeypatch):
    mixed = stage_with(llava, [LEVELS[1], LEVELS[-1]])
    tokens = {level: mixed.core(batch, level=level).visual_tokens for level in (1, len(LEVELS) - 1)}
    assert not torch.equal(tokens[1], tokens[len(LEVELS) - 1])
    coarse, fine = (tokens[level].float().mean().item() for level in (1, len(LEVELS) - 1))
    assert logged_token_means(mixed, batch, 4, monkeypatch) == [coarse, fine, coarse, fine, fine]


def test_finest_steps_train_the_finest_level_first_then_the_granularity(llava, batch, monkeypatch):
    staged = stage_with(llava, LEVELS[1], finest_steps=2)
    coarse, fine = (staged.core(batch, level=level).visual_tokens.float().mean().item() for level in (1, -1))
    assert coarse < fine
    assert logged_token_means(staged, batch, 4, monkeypatch) == [fine, fine, coarse, coarse, coarse]


def test_negative_finest_steps_are_refused(llava):
    with pytest.raises(ValueError, match=r"stage.finest_steps=-1: give a number of steps, 0 or more"):
        stage_with(llava, LEVELS[1], finest_steps=-1)


def test_a_list_with_a_granularity_the_scaler_lacks_is_refused(llava):
    with pytest.raises(ValueError, match=r"stage.granularity=\[.*3\]: train at one of"):
        stage_with(llava, [LEVELS[1], 3])
