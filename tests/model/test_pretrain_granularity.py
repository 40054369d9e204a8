"""Stage 1 at a configured granularity (``stage.granularity``): the level it trains, and a bad value."""

import re

import pytest
from omegaconf import OmegaConf
from stage_config import compose_config
from tiny_batches import LEVELS

from avglab.core.model import AvgCore
from avglab.stages.pretrain import PretrainStage


def stage_with(llava, granularity) -> PretrainStage:
    stage = compose_config("stage=pretrain").stage
    OmegaConf.set_struct(stage, False)
    stage.train, stage.granularity = ["projector"], granularity
    return PretrainStage(AvgCore(llava, LEVELS), stage)


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
