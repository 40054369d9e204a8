"""The four stages and evaluation end to end on a tiny literal config, through Hydra's compose API."""

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from stage_config import compose_stage

from avglab.run import HandoffError, run

TINY = [
    "data.synth.n_train=40",
    "data.synth.n_val=8",
    "data.synth.n_test=6",
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "stage.max_steps=2",
    "stage.val_every=2",
    "trainer.limit_val_batches=1",
    "checkpoint_every=1",
    "router.k=4",
]


def make_cfg(workspace: Path, stage: str, *overrides: str, tag: str = ""):
    batch = [] if stage == "eval" else ["stage.batch_size=4"]
    return compose_stage(workspace, stage, *TINY, *batch, *overrides, tag=tag)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Runs the whole pipeline once; the tests below read what it left."""
    ws = tmp_path_factory.mktemp("ws")
    results = {}
    for stage in ("pretrain", "instruct", "multigran", "rglf"):
        results[stage] = run(make_cfg(ws, stage))
    results["eval"] = run(make_cfg(ws, "eval"))
    return ws, results


def test_every_stage_hands_over_and_eval_writes_its_outputs(workspace):
    ws, results = workspace
    for stage in ("pretrain", "instruct", "multigran", "rglf"):
        pointer = json.loads((ws / "stages" / f"{stage}.json").read_text())
        assert (Path(pointer["path"]) / "core.safetensors").exists()
    metrics = json.loads((ws / "runs" / "eval" / "metrics.json").read_text())
    for key in (
        "accuracy",
        "accuracy_by_type",
        "visual_tokens_mean",
        "visual_tokens_full_mean",
        "token_reduction",
        "granularity_histogram",
        "latency_ms",
        "samples",
        "fingerprint",
        "token_counting",
    ):
        assert key in metrics
    assert metrics["samples"] == 6
    assert set(metrics["latency_ms"]) == {"vision_projector", "selection", "prefill", "decode", "total"}
    assert sum(metrics["granularity_histogram"].values()) == 6
    fixed = metrics["fixed_levels"]
    tokens = [fixed[f"fixed@{g}"]["visual_tokens_mean"] for g in (4, 8, 16, 32, 64)]
    assert tokens == sorted(tokens) and tokens[-1] == metrics["visual_tokens_full_mean"]
    lines = (ws / "runs" / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"id", "question_type", "prediction", "granularity", "visual_tokens"} <= set(
        json.loads(lines[0])
    )
    assert (ws / "runs" / "eval" / "granularity_histogram.png").exists()
    assert list((ws / "runs" / "rglf").glob("events.out.tfevents.*"))


def test_stage_policy_trains_only_the_router_in_rglf(workspace):
    _, results = workspace
    rglf, multigran = results["rglf"], results["multigran"]
    assert rglf["params/total"] == multigran["params/total"]
    assert 0 < rglf["params/trainable"] < multigran["params/trainable"]
    assert multigran["params/trainable"] < multigran["params/total"]  # the router is frozen there


def test_rglf_changes_only_the_router(workspace):
    from safetensors.torch import load_file

    ws, _ = workspace
    before = load_file(str(ws / "runs" / "multigran" / "model" / "core.safetensors"))
    after = load_file(str(ws / "runs" / "rglf" / "model" / "core.safetensors"))
    llava = [k for k in before if k.startswith("llava.")]
    assert llava and all(torch.equal(before[k], after[k]) for k in llava)
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("selector."))


def test_eval_refuses_a_router_whose_trained_weights_do_not_fit(workspace):
    ws, _ = workspace  # stage 4 trained router.k=4; k changes the router's voter, so k=6 cannot load it
    with pytest.raises(ValueError, match="router.k"):
        run(make_cfg(ws, "eval", "router.k=6", tag="-k6"))


def test_missing_previous_stage_names_the_command(tmp_path):
    with pytest.raises(HandoffError, match="python -m avglab stage=multigran"):
        run(make_cfg(tmp_path, "rglf"))


def test_init_from_and_ckpt_path_exclude_each_other(tmp_path):
    with pytest.raises(ValueError, match="exclude each other"):
        run(make_cfg(tmp_path, "rglf", f"init_from={tmp_path}", "ckpt_path=last"))


def test_unknown_key_fails_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException):
        make_cfg(tmp_path, "rglf", "router.kk=3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("router.k=0", "router.k"),
        ("router.granularities=[4,100]", "router.granularities"),
        ("router.token_cost_scale=log", "router.token_cost_scale"),
        ("stage.ema_decay=1.5", "stage.ema_decay"),
    ],
)
def test_bad_router_config_fails_before_the_model_is_built(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(make_cfg(tmp_path, "pretrain", override))


def test_resume_continues_from_the_last_checkpoint(workspace):
    ws, _ = workspace
    first = run(make_cfg(ws, "pretrain", "stage.max_steps=2", tag="-resume"))
    ckpt = ws / "runs" / "pretrain-resume" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["global_step"] == 2
    second = run(make_cfg(ws, "pretrain", "stage.max_steps=4", f"ckpt_path={ckpt}", tag="-resumed"))
    resumed = torch.load(
        ws / "runs" / "pretrain-resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    assert resumed["global_step"] == 4
    assert first["fit_seconds"] > 0 and second["fit_seconds"] > 0
