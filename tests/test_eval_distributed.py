"""stage=eval on 2 CPU processes (strategy=ddp) equals 1 process: every figure covers each sample once.

The test trains a tiny model for one step (a router with weights to route by), evaluates it in this
process, then starts this file as a script in 2 processes (torchrun-style environment) that evaluate
the same weights on the same 50 test samples (3 shards on rank 0, 2 on rank 1). Rank 0 must write
metrics and predictions over all 50 samples, equal to the one-process ones; latency is timed on rank 0 only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from ranks import launch, leave_together
from stage_config import compose_stage

from avglab.run import run

DATA = [
    "data.synth.n_train=8",
    "data.synth.n_val=4",
    "data.synth.n_test=50",
    "++data.synth.samples_per_shard=10",  # 5 test shards: rank 0 reads 3, rank 1 reads 2
    "data.batch_size=4",
    "router.k=4",
    "trainer.accelerator=cpu",
]
EVAL = [
    "stage.eval_batch_size=5",  # divides a shard: both runs batch the same samples together (equal answers)
    "stage.latency_samples=3",
    "stage.max_new_tokens=3",
]
FIGURES = (
    "samples",
    "accuracy",
    "accuracy_by_type",
    "visual_tokens_mean",
    "visual_tokens_full_mean",
    "token_reduction",
    "visual_tokens_per_grid_mean",
    "visual_tokens_equivalent_mean",
    "granularity_histogram",
    "granularity_histogram_by_type",
    "text_only_samples",
    "benchmark",
)


def eval_cfg(workspace: Path, name: str, *overrides: str):
    model = f"init_from={workspace}/runs/train/model"
    return compose_stage(workspace, "eval", *DATA, *EVAL, model, *overrides, name=name)


def worker(workspace: Path) -> None:
    """What the 2 processes run (started by the fixture below)."""
    run(eval_cfg(workspace, "eval-ddp", "strategy=ddp", "trainer.devices=2"))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One step of training, the one-process evaluation, then the 2-process one; returns the workspace."""
    ws = tmp_path_factory.mktemp("evaldist")
    train = ["stage.previous=null", "stage.max_steps=1", "stage.batch_size=4", "trainer.limit_val_batches=0"]
    run(compose_stage(ws, "instruct", *DATA, *train, "checkpoint_every=1000", name="train"))
    run(eval_cfg(ws, "eval-one"))
    results = launch(__file__, [str(ws)], processes=2)
    assert all(code == 0 for code, _ in results), "\n".join(err[-3000:] for _, err in results)
    return ws


def outputs(run_dir: Path) -> tuple[dict, list[dict]]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return metrics, predictions


def same(a, b) -> bool:
    """Equal figures; floats up to summation order (the ranks' samples are concatenated rank by rank)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) or isinstance(b, float):
        return b == pytest.approx(a, rel=1e-12, abs=1e-12)
    return a == b


def test_two_ranks_report_every_sample_once_with_the_figures_of_one_process(evaluated):
    one, one_predictions = outputs(evaluated / "runs" / "eval-one")
    two, two_predictions = outputs(evaluated / "runs" / "eval-ddp")
    assert one["samples"] == two["samples"] == 50 and one["ranks"] == 1 and two["ranks"] == 2
    assert len(two_predictions) == 50 and len({r["id"] for r in two_predictions}) == 50
    assert {(r["id"], r["prediction"]) for r in two_predictions} == {
        (r["id"], r["prediction"]) for r in one_predictions
    }
    for key in FIGURES:
        assert same(one[key], two[key]), key
    assert two["fixed_levels"].keys() == one["fixed_levels"].keys()
    for level, figures in one["fixed_levels"].items():
        for key in FIGURES:
            assert same(figures[key], two["fixed_levels"][level][key]), (level, key)
    assert two["skipped_samples"] == one["skipped_samples"]
    assert two["unknown_tokens"] == one["unknown_tokens"]


def test_latency_is_timed_on_rank_zero_only(evaluated):
    two, predictions = outputs(evaluated / "runs" / "eval-ddp")
    assert two["latency_samples"] == 3 and two["latency_protocol"]["timed_on"] == "rank 0"
    assert set(two["latency_ms"]) == {"vision_projector", "selection", "prefill", "decode", "total"}
    timed = [r["id"] for r in predictions if r["latency_ms"] is not None]
    assert timed == [r["id"] for r in predictions[:3]]  # rank 0's first samples come first
    assert two["batch1_agreement"] == 1.0


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    leave_together()
