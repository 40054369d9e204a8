"""Killed and resumed equals a straight run, bit for bit on CPU: weights, data order, skip counts, RNG.

A straight run to step N against a run stopped at step K and resumed from its step-K ``last.ckpt`` to N,
through ``run(cfg)``. The schedule is constant, so stopping at ``stage.max_steps=K`` is the same as being
killed at step K of N (a cosine would follow the shorter run's length). Cases (K of N): 15 of 30 in the
middle of an epoch and exactly at an epoch end; 5 of 10 in the middle of a pass read by 2 loader workers
with shards of unequal size, with samples skipped (the resumed pass's round robin goes on at the second
worker); 5 of 10 of stage 4 with router dropout (the random number generators resume too).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_config import compose_stage

from avglab.run import run

TINY = [
    "stage.previous=null",  # random weights: no earlier stage needed
    "trainer.accelerator=cpu",  # bit for bit: GPU kernels (attention backward) may add in any order
    "data.batch_size=4",
    "stage.batch_size=4",
    "++stage.global_batch_size=null",  # one micro batch a step (stage 4's default accumulates to 128)
    "data.synth.n_val=4",
    "data.synth.n_test=4",
    "++stage.schedule=constant",
    "stage.warmup_ratio=0.0",
    "stage.val_every=10",
    "trainer.limit_val_batches=1",
    "router.k=4",
]
CASES = {  # name: (stage, K, N, overrides)
    # 10 batches an epoch: step 15 is the 5th batch of the second epoch (2 passes of 24 samples each)
    "mid_epoch": ("instruct", 15, 30, ["data.synth.n_train=24", "data.epoch_samples=40"]),
    # 15 batches an epoch: step 15 ends the first epoch
    "epoch_end": ("instruct", 15, 30, ["data.synth.n_train=24", "data.epoch_samples=60"]),
    # an epoch is one pass: 5 shards of 10, 10, 10, 10, 6 samples, the 2 workers read 26 and 20; images over
    # 320 tokens are skipped, so a pass is 10 batches, worker 0's and 1's in turn until 0 ends (its 5th is
    # partial) and then 1 (partial too); step 5 is worker 0's third batch
    "workers_mid_pass": (
        "instruct",
        5,
        10,
        [
            "data.synth.n_train=46",
            "++data.synth.samples_per_shard=10",
            "data.num_workers=2",
            "data.max_length=320",
            "data.synth.n_val=12",
            "data.max_skip_fraction=1.0",
            "stage.val_every=4",
        ],
    ),
    # stage 4 trains the router alone; its dropout draws from torch's generator every step (4-batch epochs)
    "router_dropout": (
        "rglf",
        5,
        10,
        ["data.synth.n_train=24", "data.epoch_samples=16", "router.dropout=0.3", "stage.val_every=4"],
    ),
}


def train(workspace: Path, case: str, name: str, steps: int, *overrides: str) -> dict:
    stage, kill, _, data = CASES[case]
    every = f"checkpoint_every={kill}"
    cfg = compose_stage(
        workspace, stage, *TINY, *data, every, f"stage.max_steps={steps}", *overrides, name=name
    )
    return run(cfg)


def weights(workspace: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(workspace / "runs" / name / "model" / "core.safetensors"))


# Mid-epoch and epoch end run by default; the worker and dropout cases (a minute more) in `make test-slow`.
SLOW_CASES = {"workers_mid_pass", "router_dropout"}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_killed_and_resumed_equals_a_straight_run(tmp_path, case):
    _, kill, total, _ = CASES[case]
    straight = train(tmp_path, case, "straight", total)
    train(tmp_path, case, "killed", kill)
    ckpt = tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == kill
    (position,) = state["ShardDataModule"]["train_position"]  # one rank
    resumed = train(tmp_path, case, "resumed", total, f"ckpt_path={ckpt}")
    before, after = weights(tmp_path, "straight"), weights(tmp_path, "resumed")
    assert before.keys() == after.keys()
    different = [k for k in before if not torch.equal(before[k], after[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"
    assert resumed["skipped_samples"] == straight["skipped_samples"]
    assert resumed["unknown_tokens"] == straight["unknown_tokens"]
    if case == "workers_mid_pass":  # both workers have batches left; the next one is worker 1's
        assert straight["skipped_samples"]["visual_tokens_over_max_length"] > 0
        assert position["last"] == 0 and position["epoch_batches"] == 5
        assert not any(ended for _, ended in position["workers"])
    if case == "router_dropout":
        assert len(state["avglab_rng_states"]) == 1
