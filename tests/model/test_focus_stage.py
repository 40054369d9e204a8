"""FocusLLaVA through Hydra: stage=focus trains, stage=eval reports both token counts; bad keys are named."""

import json
from pathlib import Path

import pytest
from stage_config import compose_stage

from avglab.focus.regions import FocusConfigError
from avglab.run import run

TINY = [
    "data.synth.n_train=24",
    "data.synth.n_val=4",
    "data.synth.n_test=4",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "stage.max_steps=2",
    "stage.val_every=2",
    "trainer.limit_val_batches=1",
    "checkpoint_every=2",
]


def make_cfg(workspace: Path, stage: str, *overrides: str, tag: str = ""):
    batch = [] if stage == "eval" else ["stage.batch_size=4"]
    return compose_stage(workspace, stage, *TINY, *batch, *overrides, tag=tag)


def test_focus_trains_and_evaluation_reports_first_layer_and_equivalent_tokens(tmp_path, capsys):
    trained = run(make_cfg(tmp_path, "focus", "focus=both", "stage.previous=null"))
    assert 0 < trained["params/trainable"] <= trained["params/total"]
    assert {"train/loss_balance", "train/visual_tokens_equivalent_mean"} <= set(trained)
    pointer = json.loads((tmp_path / "stages" / "focus.json").read_text())
    metrics = run(make_cfg(tmp_path, "eval", "focus=both", f"init_from={pointer['path']}"))
    assert metrics["selector"] == "focus_both" and metrics["samples"] == 4
    assert metrics["visual_tokens_equivalent_mean"] < metrics["visual_tokens_mean"]  # pruned inside the LLM
    assert (
        metrics["visual_tokens_mean"] <= metrics["visual_tokens_full_mean"]
    )  # the vision sampler never adds
    full = metrics["fixed_levels"]["fixed@64"]
    assert full["visual_tokens_mean"] == metrics["visual_tokens_full_mean"]
    # the fixed@g rows are the plain fixed-level baselines: no text sampler pruning inside the LLM
    for row in metrics["fixed_levels"].values():
        assert row["visual_tokens_equivalent_mean"] == row["visual_tokens_mean"]
    # the samplers choose no granularity level: "n/a", and no all-zero histogram figure
    assert metrics["visual_tokens_per_grid_mean"] is None and metrics["per_grid_kept"] is None
    assert not (tmp_path / "runs" / "eval" / "granularity_histogram.png").exists()
    focus_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| focus_both"))
    assert "| n/a |" in focus_row
    line = json.loads((tmp_path / "runs" / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert line["visual_tokens_equivalent"] <= line["visual_tokens"]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stage=rglf", "focus=both"], "focus=both runs with stage=focus"),
        (["stage=focus", "focus=vision", "focus.vision.window=3"], "focus.vision.branches"),
        (
            ["stage=focus", "focus=vision", "focus.vision.balance_weights=[1,1,2]"],
            "focus.vision.balance_weights",
        ),
        (["stage=focus", "focus=text", "focus.text.layer_range=[1,5]"], "focus.text.layer_range"),
        (["stage=focus", "focus=text", "focus.text.gamma=0"], "focus.text.gamma"),
        (["stage=focus", "focus=none"], "stage=focus trains FocusLLaVA"),
    ],
)
def test_bad_focus_config_names_the_key(tmp_path, overrides, key):
    stage, *rest = overrides
    with pytest.raises((FocusConfigError, ValueError), match=key):
        run(make_cfg(tmp_path, stage.split("=")[1], *rest, "stage.previous=null"))
