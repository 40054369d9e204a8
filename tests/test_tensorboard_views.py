"""TensorBoard, read by its own server, shows a sweep in HParams, the result table, routing grids, named lrs.

One workspace: stage 1 (one step), a two-member ``router.k`` multirun of the ablation experiment's
``full`` row (stage 4 from a feedback cache, then its evaluation) and an evaluation with every fixed
level. TensorBoard's server is started on loopback over it and asked what its dashboards would show.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from stage_config import SMALL_SYNTH, compose_run

from avglab.run import run
from avglab.training.tensorboard_hparams import HPARAM_KEYS

TINY = [*SMALL_SYNTH, "trainer.log_every_n_steps=1"]
SWEEP = [
    "experiment=ablations",
    "ablation=full",
    "stage.previous=pretrain",
    "stage.max_steps=2",
    "stage.val_every=2",
    "stage.batch_size=4",
    "++stage.cache_train_samples=8",
    "++stage.cache_val_samples=4",
    "eval_after.latency_samples=1",
    "router.k=2,4",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    pretrain = [
        "stage=pretrain",
        "stage.max_steps=1",
        "stage.val_every=1",
        "stage.batch_size=4",
        "stage.previous=null",
    ]
    run(compose_run(ws, f"{ws}/runs/pretrain/a", *TINY, *pretrain))
    env = {**os.environ, "AVGLAB_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    sweep = [sys.executable, "-m", "avglab", "-m", *TINY, *SWEEP]
    subprocess.run(sweep, env=env, check=True, capture_output=True, timeout=600)
    run(
        compose_run(
            ws,
            f"{ws}/runs/eval/a",
            *TINY,
            "stage=eval",
            "router=random",
            "stage.previous=pretrain",
            "stage.latency_samples=1",
        )
    )
    return ws


@pytest.fixture(scope="module")
def board(workspace):
    """TensorBoard's server on 127.0.0.1 over the workspace; returns a GET/POST helper on its data routes."""
    from tensorboard import program

    tb = program.TensorBoard()
    tb.configure(
        argv=[None, "--logdir", str(workspace), "--host", "127.0.0.1", "--port", "0", "--load_fast", "false"]
    )
    url = tb.launch()

    def ask(route: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "X-TensorBoard-Feature-Flags": "{}"}
        with urllib.request.urlopen(urllib.request.Request(url + route, data, headers), timeout=30) as r:
            return json.loads(r.read())

    deadline = time.time() + 60  # the first load runs in the server's background thread
    while time.time() < deadline and len(sessions(ask)) < 6:  # stage 1, eval, two members and their evals
        time.sleep(1)
    return ask


def groups_request() -> dict:
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    return {"experimentName": "", "allowedStatuses": statuses, "colParams": [], "sliceSize": 100}


def sessions(ask) -> dict[str, dict]:
    """Session name (its run) -> {"hparams": ..., "metrics": {tag: value}} of the HParams table."""
    out = {}
    for group in ask("data/plugin/hparams/session_groups", groups_request()).get("sessionGroups", []):
        for session in group["sessions"]:
            metrics = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
            out[session["name"]] = {"hparams": group["hparams"], "metrics": metrics}
    return out


def test_the_sweeps_jobs_leave_the_workspaces_stage_output_alone(workspace):
    assert len(list(workspace.glob("multirun/*/*/model/core.safetensors"))) == 2  # both jobs trained
    assert not (workspace / "stages" / "rglf.json").exists()  # multirun jobs do not publish by default


def test_hparams_list_the_sweep_members_with_their_knobs_and_metrics(board):
    experiment = board("data/plugin/hparams/experiment", {"experimentName": ""})
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert set(HPARAM_KEYS) <= columns
    metric_tags = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {
        "hparams/accuracy",
        "hparams/tokens_vs_full",
        "hparams/share_64",
        "hparams/train_loss",
    } <= metric_tags
    found = sessions(board)
    members = {
        name: s for name, s in found.items() if name.startswith("multirun/") and name.endswith("/eval")
    }
    assert sorted(s["hparams"]["router.k"] for s in members.values()) == [2, 4]
    for s in members.values():
        assert s["hparams"]["ablation"] == "full" and s["hparams"]["stage.name"] == "eval"
        assert s["hparams"]["stage.alpha"] == 0.5  # the knob of the stage that trained the evaluated router
        assert 0 <= s["metrics"]["hparams/accuracy"] <= 1 and s["metrics"]["hparams/visual_tokens_mean"] > 0
        shares = [v for tag, v in s["metrics"].items() if tag.startswith("hparams/share_")]
        assert len(shares) == 5 and sum(shares) == pytest.approx(1.0)
    trained = [s for name, s in found.items() if name.startswith("multirun/") and not name.endswith("/eval")]
    assert sorted(s["hparams"]["router.k"] for s in trained) == [2, 4]
    assert all("hparams/train_loss" in s["metrics"] and s["hparams"]["stage.alpha"] == 0.5 for s in trained)


def test_a_sweep_members_command_line_knobs_come_first_in_the_hparams_columns(workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    member = EventAccumulator(str(next(workspace.glob("multirun/*/0"))))
    member.Reload()
    content = member.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.EXPERIMENT_TAG]
    infos = metadata.parse_experiment_plugin_data(content).hparam_infos
    assert {i.name for i in infos if i.differs} == {"ablation", "router.k", "stage.max_steps"}


def test_text_images_and_scalars_hold_the_views_named_by_tab(board, workspace):
    text = board("data/plugin/text/tags")
    assert "eval/result_table/text_summary" in text["runs/eval/a"]
    assert "config/text_summary" in text["runs/pretrain/a"]
    table = board("data/plugin/text/text?run=runs/eval/a&tag=eval/result_table/text_summary")[0]["text"]
    assert all(row in table for row in ("random", "fixed@4", "fixed@64")), table  # every selector row
    images = board("data/plugin/images/tags")
    assert {"eval/sample_grid", "eval/accuracy_vs_tokens"} <= set(images["runs/eval/a"])
    member = next(r for r in images if r.startswith("multirun/") and not r.endswith("/eval"))
    assert "val/sample_grid" in images[member] and "eval/sample_grid" in images[member + "/eval"]
    scalars = board("data/plugin/scalars/tags")
    assert {"lr/vision", "lr/projector", "lr/llm"} <= set(scalars["runs/pretrain/a"])
    assert "lr/router" in scalars[member] and not any(t.startswith("lr-") for t in scalars[member])
