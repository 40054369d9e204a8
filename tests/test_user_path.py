"""A user's own LLaVA-format set, converted by the converter, through every stage, eval and export.

The path a researcher takes off the embedded default: ``python -m avglab.data.convert`` on their JSON
(images of several sizes, multi-turn, text-only, bad records), then ``data=shards data.root=<out>``
for pretrain, instruct, multigran, rglf, rglf_cached, focus and eval, and ``python -m avglab.tools.export``
- with ``model=tiny`` (its tokenizer built from the shards), with ``model=tiny_spatial`` (the README's
walk-through: the conv-stem tower, which export refuses) and with a checkpoint folder
(``model=llava_next_vicuna_7b model.path=...``). Each config is composed exactly as the CLI composes
it and handed to ``run``; one evaluation goes through ``python -m avglab`` itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_config import compose_stage
from transformers import LlavaNextForConditionalGeneration
from userdata import user_llava_shards  # noqa: F401 - the session fixture

from avglab.core.tiny_checkpoint import TINY_OVERRIDES, write_tiny_checkpoint
from avglab.data.vocabulary import shard_vocabulary
from avglab.run import run
from avglab.tools.export import main as export_main

FEW_STEPS = [
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "stage.max_steps=2",
    "stage.val_every=2",
    "trainer.limit_val_batches=1",
    "router.k=4",
]
EVAL = ["stage.compare_fixed=false", "stage.max_new_tokens=3", "stage.latency_samples=2"]
TRAINING = ("pretrain", "instruct", "multigran", "rglf")


def user_cfg(workspace: Path, root: Path, stage: str, model: list[str], *overrides: str, tag: str = ""):
    # The paper's global batch (128) would accumulate 32 micro-batches an optimizer step.
    per_stage = EVAL if stage == "eval" else ["stage.batch_size=4", "stage.global_batch_size=null"]
    return compose_stage(
        workspace,
        stage,
        "data=shards",
        f"data.root={root}",
        *model,
        *FEW_STEPS,
        *per_stage,
        *overrides,
        tag=tag,
    )


def walk(workspace: Path, root: Path, model: list[str]) -> dict:
    """Every stage in order on the user's shards; returns each run's metrics by name."""
    results = {stage: run(user_cfg(workspace, root, stage, model)) for stage in TRAINING}
    results["eval"] = run(user_cfg(workspace, root, "eval", model))
    results["rglf_cached"] = run(
        user_cfg(
            workspace,
            root,
            "rglf_cached",
            model,
            "stage.cache_train_samples=24",
            "stage.cache_val_samples=4",
            "stage.previous=multigran",
        )
    )
    results["focus"] = run(user_cfg(workspace, root, "focus", model, "focus=both", "stage.previous=pretrain"))
    results["eval_focus"] = run(
        user_cfg(workspace, root, "eval", model, "focus=both", "stage.previous=focus", tag="_focus")
    )
    return results


@pytest.fixture(scope="module")
def tiny_walk(user_llava_shards, tmp_path_factory):  # noqa: F811 - the fixture imported above
    ws = tmp_path_factory.mktemp("user_tiny")
    return ws, walk(ws, user_llava_shards.root, ["model=tiny"])


@pytest.fixture(scope="module")
def tiny_spatial_walk(user_llava_shards, tmp_path_factory):  # noqa: F811
    ws = tmp_path_factory.mktemp("user_tiny_spatial")
    return ws, walk(ws, user_llava_shards.root, ["model=tiny_spatial"])


@pytest.fixture(scope="module")
def checkpoint_walk(user_llava_shards, tmp_path_factory):  # noqa: F811
    ws = tmp_path_factory.mktemp("user_ckpt")
    urls = {s: sorted(str(p) for p in user_llava_shards.root.glob(f"{s}-*.tar")) for s in ("train", "test")}
    checkpoint = write_tiny_checkpoint(ws / "checkpoint", shard_vocabulary(urls, "vicuna_v1"), seed=1)
    model = ["model=llava_next_vicuna_7b", f"model.path={checkpoint}", *TINY_OVERRIDES]
    offline = pytest.MonkeyPatch()
    offline.setenv("HF_HUB_OFFLINE", "1")  # a checkpoint folder loads without the network
    try:
        yield ws, walk(ws, user_llava_shards.root, model)
    finally:
        offline.undo()


def check_walk(ws: Path, results: dict, test_samples: int) -> None:
    for stage in (*TRAINING, "rglf_cached", "focus"):
        assert torch.isfinite(torch.tensor(results[stage]["train/loss"])), stage
        assert results[stage]["skipped_samples"] == {}, stage  # the converter already dropped the bad records
    for name in ("eval", "eval_focus"):
        metrics = results[name]
        assert metrics["samples"] == test_samples, name  # every converted test sample, once
        lines = (ws / "runs" / name / "predictions.jsonl").read_text().splitlines()
        assert len({json.loads(line)["id"] for line in lines}) == test_samples
        assert metrics["fingerprint"]["data_config"]["root"].endswith("shards")
    routed = results["eval"]
    assert sum(routed["granularity_histogram"].values()) == test_samples
    assert 0 < routed["visual_tokens_mean"] <= routed["visual_tokens_full_mean"]


def test_tiny_model_walks_every_stage_on_the_users_shards(tiny_walk, user_llava_shards):  # noqa: F811
    ws, results = tiny_walk
    check_walk(ws, results, user_llava_shards.converted["test"])
    # The tokenizer was built from the shards: the user's words are known, none is <unk>.
    assert results["instruct"]["unknown_tokens"] == {"tokens": 0, "samples": 0}
    assert results["eval"]["unknown_tokens"] == {"tokens": 0, "samples": 0}
    stage_output = Path(json.loads((ws / "stages" / "rglf.json").read_text())["path"])
    assert (stage_output / "tokenizer.json").exists()  # later stages and exports keep these word ids


def test_tiny_spatial_model_walks_every_stage_on_the_users_shards(tiny_spatial_walk, user_llava_shards):  # noqa: F811
    """The README's own-data commands: every stage output holds (and the next loads) the conv-stem tower."""
    ws, results = tiny_spatial_walk
    check_walk(ws, results, user_llava_shards.converted["test"])
    stage_output = Path(json.loads((ws / "stages" / "rglf.json").read_text())["path"])
    weights = load_file(str(stage_output / "core.safetensors"))
    assert any(".embeddings.patch_embedding.layers." in key for key in weights)
    with pytest.raises(ValueError, match="vision_stem=conv"):
        export_main([str(stage_output), str(ws / "export")])


def test_checkpoint_model_walks_every_stage_on_the_users_shards(checkpoint_walk, user_llava_shards):  # noqa: F811
    ws, results = checkpoint_walk
    check_walk(ws, results, user_llava_shards.converted["test"])


def test_export_of_the_users_model_loads_in_transformers(tiny_walk, tmp_path):
    ws, _ = tiny_walk
    out = tmp_path / "export"
    export_main([str(ws / "runs" / "rglf" / "model"), str(out)])
    llava = LlavaNextForConditionalGeneration.from_pretrained(out)
    assert llava.config.text_config.eos_token_id == 3  # </s> of the word tokenizer, so generate stops there
    words = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    assert "square" in words and "circle" in words  # the user's vocabulary, not the generator's


def test_cli_evaluates_the_users_shards(tiny_walk, user_llava_shards):  # noqa: F811
    """``python -m avglab stage=eval data=shards data.root=...`` as typed, in the workspace the walk left."""
    ws, _ = tiny_walk
    command = [
        sys.executable,
        "-m",
        "avglab",
        "stage=eval",
        "model=tiny",
        "data=shards",
        f"data.root={user_llava_shards.root}",
        *FEW_STEPS,
        *EVAL,
    ]
    env = {**os.environ, "AVGLAB_WORKSPACE": str(ws), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert printed.count("GPU available") == 1 and "litlogger" not in printed  # each log line once, no advert
    written = sorted((ws / "runs" / "eval").glob("*/metrics.json"))
    assert len(written) == 1
    assert json.loads(written[0].read_text())["samples"] == user_llava_shards.converted["test"]


def test_a_narrow_router_and_the_baselines_run_on_the_users_shards(tiny_walk, user_llava_shards):  # noqa: F811
    """``router=avg_narrow`` trains, then evaluates with ``reduce=`` and ``stage.compare_reduce``."""
    ws, _ = tiny_walk
    root, tiny, test_samples = user_llava_shards.root, ["model=tiny"], user_llava_shards.converted["test"]
    narrow = ["router=avg_narrow", "router.width=16", "publish_stage_output=false"]
    trained = run(user_cfg(ws, root, "rglf", tiny, *narrow, "stage.previous=multigran", tag="_narrow"))
    assert torch.isfinite(torch.tensor(trained["train/loss"]))
    compared = "stage.compare_reduce=[{name:fastv,layer:1,keep:0.5},prumerge_plus]"
    reduced = ["reduce=vtw", "reduce.layer=1", compared, "stage.previous=null"]
    init = f"init_from={ws}/runs/rglf_narrow/model"
    metrics = run(user_cfg(ws, root, "eval", tiny, *narrow, *reduced, init, tag="_narrow"))
    assert metrics["reduction"] == {"name": "vtw", "layer": 1}
    rows = {"avg": metrics, **metrics["reductions"]}
    assert set(rows) == {"avg", "avg+fastv(K=1,keep=0.5)", "avg+prumerge_plus"}
    for name, row in rows.items():
        assert row["samples"] == test_samples, name  # every converted test sample in every row
        assert 0 < row["prefill_flops_relative"] < 1, (
            name
        )  # each prunes something, within the LLM or before it
