"""Killed and resumed under ``strategy=ddp`` on 2 CPU processes equals a straight run, bit for bit.

The test starts this file as a script in 2 processes (torchrun-style environment): a straight 10-step run,
a 5-step run and its resume to step 10. Each rank reads its own shards, so the checkpoint must hold every
rank's data position and random generators (rank 0 writes it) and each rank must take back its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from ranks import launch, leave_together
from safetensors.torch import load_file
from stage_config import compose_stage

from avglab.run import run

TWO_RANKS = [
    "stage.previous=null",
    "strategy=ddp",
    "trainer.devices=2",
    "trainer.accelerator=cpu",
    "data.synth.n_train=40",
    "data.synth.n_val=20",
    "data.synth.n_test=4",
    "++data.synth.samples_per_shard=10",  # 4 train shards: 2 per rank
    "data.epoch_samples=24",  # 3 batches an epoch on each rank: step 5 is mid-epoch
    "data.batch_size=4",
    "stage.batch_size=4",
    "++stage.global_batch_size=null",
    "++stage.schedule=constant",  # stopping at step 5 is then being killed at step 5 of 10
    "stage.warmup_ratio=0.0",
    "stage.val_every=4",
    "trainer.limit_val_batches=1",
    "checkpoint_every=5",
    "router.k=4",
]


def cfg(workspace: Path, name: str, steps: int, *overrides: str):
    return compose_stage(workspace, "instruct", *TWO_RANKS, f"stage.max_steps={steps}", *overrides, name=name)


def worker(workspace: Path) -> None:
    """What the 2 processes run."""
    run(cfg(workspace, "straight", 10))
    run(cfg(workspace, "killed", 5))
    run(cfg(workspace, "resumed", 10, f"ckpt_path={workspace}/runs/killed/checkpoints/last.ckpt"))


@pytest.mark.slow
def test_two_ranks_killed_and_resumed_equal_a_straight_run(tmp_path):
    results = launch(__file__, [str(tmp_path)], processes=2)
    assert all(code == 0 for code, _ in results), "\n".join(err[-3000:] for _, err in results)
    state = torch.load(tmp_path / "runs" / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    positions = state["ShardDataModule"]["train_position"]
    assert [p["layout"]["rank"] for p in positions] == [0, 1] and len(state["avglab_rng_states"]) == 2
    straight = load_file(str(tmp_path / "runs" / "straight" / "model" / "core.safetensors"))
    resumed = load_file(str(tmp_path / "runs" / "resumed" / "model" / "core.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    leave_together()
