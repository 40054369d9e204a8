"""Torn checkpoints: ckpt_path=last resumes from the newest intact one, saves are atomic, leftovers go."""

import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from stage_config import compose_stage

from avglab.run import HandoffError, run
from avglab.training.checkpoints import (
    AtomicCheckpointIO,
    CheckpointError,
    checkpoint_problem,
    temp_path,
)

SMALL = [
    "data.synth.n_train=8",
    "data.synth.n_val=4",
    "data.synth.n_test=2",
    "data.batch_size=4",
    "stage.batch_size=4",
    "stage.val_every=2",
    "trainer.limit_val_batches=1",
    "checkpoint_every=1",
    "router.k=4",
]


def tear(path):
    """Cuts a file in half, as a kill during a copy does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step pretrain run: checkpoints/{epoch=0-step=2.ckpt, last.ckpt}."""
    ws = tmp_path_factory.mktemp("ws")
    run(compose_stage(ws, "pretrain", *SMALL, "stage.max_steps=2", name="pretrain/a"))
    return ws, ws / "runs" / "pretrain" / "a" / "checkpoints"


def test_torn_last_falls_back_to_the_intact_step_checkpoint(trained, caplog):
    ws, folder = trained
    step = folder / "epoch=0-step=2.ckpt"
    assert checkpoint_problem(folder / "last.ckpt") is None and checkpoint_problem(step) is None
    tear(folder / "last.ckpt")
    stale = temp_path(folder / "last.ckpt").with_name(
        f".last.ckpt.tmp-{socket.gethostname()}-{dead_pid()}-0a1b"
    )
    stale.write_bytes(b"\0" * 4096)  # a save killed outright
    assert "torn" in checkpoint_problem(folder / "last.ckpt")
    with caplog.at_level(logging.INFO, logger="avglab"):
        metrics = run(
            compose_stage(ws, "pretrain", *SMALL, "stage.max_steps=3", "ckpt_path=last", name="pretrain/b")
        )
    log = caplog.text
    assert f"skipped {folder / 'last.ckpt'} (torn" in log and f"resuming from {step}" in log
    assert not stale.exists()
    resumed = torch.load(ws / "runs/pretrain/b/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 3 and metrics["fit_seconds"] > 0
    leftovers = [p.name for p in (ws / "runs/pretrain/b/checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic saves leave no temporary file


def test_explicit_torn_checkpoint_names_the_intact_ones(trained):
    ws, folder = trained
    torn = folder / "torn.ckpt"
    torn.write_bytes((folder / "epoch=0-step=2.ckpt").read_bytes()[:1000])
    cfg = compose_stage(ws, "pretrain", *SMALL, "stage.max_steps=3", f"ckpt_path={torn}", name="pretrain/c")
    with pytest.raises(
        CheckpointError, match=r"torn.ckpt cannot be resumed from: torn .*epoch=0-step=2.ckpt"
    ):
        run(cfg)
    assert not (ws / "runs/pretrain/c/model").exists()


def test_last_without_any_intact_checkpoint_says_so(tmp_path):
    folder = tmp_path / "runs" / "pretrain" / "old" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"PK\x03\x04 cut")
    cfg = compose_stage(tmp_path, "pretrain", *SMALL, "ckpt_path=last", name="pretrain/new")
    with pytest.raises(
        HandoffError, match=r"no intact checkpoint.*every checkpoint found is torn.*last.ckpt"
    ):
        run(cfg)


def test_a_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)
    before = target.read_bytes()

    def killed(obj, f, *args, **kwargs):
        f.write(b"\0" * 10_000)  # half a checkpoint, then the process is interrupted
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]
