"""Every run gets its own folder, and multirun jobs do not become the workspace's stage output."""

import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from stage_config import compose_config

TINY = [
    "data.synth.n_train=16",
    "data.synth.n_val=4",
    "data.synth.n_test=4",
    "data.batch_size=4",
    "stage.batch_size=4",
    "stage.max_steps=1",
    "trainer.limit_val_batches=0",
]


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    configs = [compose_config(f"workspace={tmp_path}", "stage=eval", hydra=True) for _ in range(3)]
    folders = [c.hydra.run.dir for c in configs]
    assert len(set(folders)) == 3 and all(f.startswith(f"{tmp_path}/runs/eval/") for f in folders)
    first = configs[0]
    assert first.hydra.run.dir == folders[0]  # resolved once: one config names one folder
    assert OmegaConf.select(first, "hydra.run.dir") == folders[0]


@pytest.mark.slow  # the default run checks the first half on its TensorBoard sweep (test_tensorboard_views)
def test_multirun_jobs_leave_the_stage_output_alone_unless_asked(tmp_path):
    """``python -m avglab -m ... seed=0,1``: neither job publishes; ``publish_stage_output=true`` does."""
    env = {**os.environ, "AVGLAB_WORKSPACE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "avglab", "-m", "stage=pretrain", *TINY]
    subprocess.run([*command, "seed=0,1"], env=env, check=True, capture_output=True, timeout=300)
    jobs = sorted(tmp_path.glob("multirun/*/*/model/core.safetensors"))
    assert len(jobs) == 2 and not (tmp_path / "stages" / "pretrain.json").exists()
    asked = [*command, "seed=2", "publish_stage_output=true"]
    subprocess.run(asked, env=env, check=True, capture_output=True, timeout=300)
    published = json.loads((tmp_path / "stages" / "pretrain.json").read_text())["path"]
    assert "multirun" in published and os.path.exists(published)
