"""``model=tiny_spatial``: the tiny model set up for the spatial set, and the walk-through it is used in."""

import json
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from stage_config import SMALL_SYNTH, compose_stage

from avglab.cli import CONFIG_DIR
from avglab.data import spatial
from avglab.run import run
from avglab.tools.export import export_stage

STAGES = sorted(p.stem for p in (Path(CONFIG_DIR) / "stage").glob("*.yaml"))
OWN = {
    "model": {"name", "text_init_range", "vision_position_init", "vision_stem"},
    "pretrain": {"batch_size", "granularity", "finest_steps", "max_steps", "val_every"},
    "instruct": {"max_steps", "val_every"},
}


def composed(tmp_path: Path, stage: str, model: str) -> dict:
    cfg = OmegaConf.to_container(
        compose_stage(tmp_path, stage, f"model={model}", "data=spatial"), resolve=False
    )
    for key in OWN["model"]:
        cfg["model"].pop(key)
    for key in OWN.get(stage, ()):
        cfg["stage"].pop(key)
    return cfg


def evaluate_at_finest(workspace: Path, *overrides: str) -> dict:
    """The README's eval of stage 2's output at the finest level, without the fixed levels or timing."""
    fixed = ["stage.compare_fixed=false", "stage.latency_samples=0", "stage.max_new_tokens=4"]
    eval_cfg = compose_stage(workspace, "eval", *overrides, "stage.previous=instruct", "router=none", *fixed)
    return run(eval_cfg)


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_spatial_is_the_tiny_model_and_recipes_but_its_tower_init_and_stage_lengths(tmp_path, stage):
    """A stage without a tiny_spatial recipe would fall back to the paper's settings and differ here."""
    assert composed(tmp_path, stage, "tiny_spatial") == composed(tmp_path, stage, "tiny")
    cfg = compose_stage(tmp_path, stage, "model=tiny_spatial")
    assert cfg.model.name == "tiny_spatial" and cfg.model.text_init_range == 0.1
    assert cfg.model.vision_position_init == "sincos" and cfg.model.vision_stem == "conv"
    if stage == "pretrain":
        tiny = compose_stage(tmp_path, stage, "model=tiny").stage
        assert cfg.stage.max_steps > tiny.max_steps
        assert cfg.stage.granularity == 32 and tiny.granularity is None  # the demo's stage 1: the finest
        assert 0 < cfg.stage.finest_steps < cfg.stage.max_steps and tiny.finest_steps == 0
    if stage == "instruct":
        assert cfg.stage.max_steps > compose_stage(tmp_path, stage, "model=tiny").stage.max_steps


def test_the_spatial_walkthrough_trains_and_scores_every_kind(tmp_path):
    """The README's commands: generate and convert the set, stages 1 and 2 of the preset, accuracy by kind."""
    out = tmp_path / "spatial"
    spatial.main(
        [str(out), "--train", "8", "--val", "2", "--test", "6", "--questions-per-kind", "2", "--convert"]
    )
    common = ["model=tiny_spatial", "data=spatial", f"data.root={out}/shards", "data.batch_size=4"]
    pretrain = run(
        compose_stage(
            tmp_path, "pretrain", *common, "stage.max_steps=2", "stage.val_every=2", "stage.batch_size=4"
        )
    )
    assert pretrain["val/loss"] > 0
    assert pretrain["train/visual_tokens_mean"] == 64 + 64 + 8  # its first steps train the finest level
    with pytest.raises(ValueError, match="vision_stem=conv, which transformers' CLIP cannot load"):
        export_stage(str(next(tmp_path.glob("runs/pretrain/model"))), tmp_path / "export")
    # stage 1 at 32 tokens per tile: a 64-px image's global view, its unpadded local half, a newline per row
    assert pretrain["val/visual_tokens_mean"] == 32 + 32 + 8
    instruct = run(compose_stage(tmp_path, "instruct", *common, "stage.max_steps=1", "stage.batch_size=4"))
    assert instruct["train/visual_tokens_mean"] == 64 + 64 + 8  # stage 2 trains the finest level
    scored = evaluate_at_finest(tmp_path, *common, "data.eval_batch_size=4")
    assert scored["samples"] == 6 and set(scored["accuracy_by_type"]) == set(spatial.KINDS)
    predictions = [json.loads(line) for line in next(tmp_path.glob("runs/eval/predictions.jsonl")).open()]
    assert len(predictions) == 6 and all(
        len(p["answers"][0].split()) >= 2 for p in predictions
    )  # named answers


def test_the_embedded_shape_question_trains_on_dialogues_that_ask_every_kind(tmp_path):
    """The study's embedded-set command: ``shape`` asked, each training dialogue asking all four kinds."""
    kinds = "data.synth.question_kinds=[background_color,shape,shape_color,marker_color]"
    common = ["model=tiny_spatial", kinds, "data.synth.train_questions=4", *SMALL_SYNTH]
    pretrain = run(
        compose_stage(
            tmp_path, "pretrain", *common, "stage.max_steps=2", "stage.val_every=2", "stage.batch_size=4"
        )
    )
    assert pretrain["val/loss"] > 0
    (shards,) = tmp_path.glob("data/synth-*/train-00000.tar")
    with tarfile.open(shards) as tar:
        records = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")]
    assert records and all(len(r["conversations"]) == 8 for r in records)
    assert sum(
        "what shape is the big object?" in t["value"] for r in records for t in r["conversations"]
    ) == len(records)
    run(compose_stage(tmp_path, "instruct", *common, "stage.max_steps=1", "stage.batch_size=4"))
    scored = evaluate_at_finest(tmp_path, *common)
    assert scored["samples"] == 6 and set(scored["accuracy_by_type"]) <= {"glance", "gaze"}


def test_the_masked_context_objective_runs_as_the_study_invokes_it(tmp_path):
    """The study's ``stage.module=...ContextPretrainStage`` with ``context_mask``, on the spatial set."""
    out = tmp_path / "spatial"
    spatial.main([str(out), "--train", "8", "--val", "2", "--test", "3", "--convert"])
    overrides = [
        "model=tiny_spatial",
        "data=spatial",
        f"data.root={out}/shards",
        "data.batch_size=4",
        "stage.max_steps=2",
        "stage.val_every=2",
        "stage.batch_size=4",
        "stage.module=avglab.stages.context.ContextPretrainStage",
        "+stage.context_radius=0",
        "+stage.context_cell=2",
        "+stage.context_weight=1",
    ]
    pretrain = run(compose_stage(tmp_path, "pretrain", *overrides, "+stage.context_mask=0.25"))
    assert pretrain["val/loss"] > 0 and pretrain["val/context_loss"] > 0
    with pytest.raises(ValueError, match=r"stage.context_mask=1.5 must be in \[0, 1\)"):
        run(compose_stage(tmp_path, "pretrain", *overrides, "+stage.context_mask=1.5", tag="_bad"))
