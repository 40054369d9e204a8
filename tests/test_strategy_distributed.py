"""DDP and FSDP2 on 2 CPU processes: one process's step on the same global batch; FSDP2 save and resume.

The test starts this file as a script in 2 processes (torchrun-style environment). They run one
optimizer step with ``strategy=ddp`` and one with ``strategy=fsdp2`` on a fixed global batch of 4
(2 per process), then the FSDP2 pipeline through ``run()``: 2 steps with sharded checkpoints, a
resume that adds no step (its weights must equal the saved ones) and a resume that trains one
more step. One process with accumulation 2 on the same global batch gives the reference.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import get_class
from safetensors.torch import load_file, save_file
from stage_config import compose_stage
from torch.utils.data import DataLoader, IterableDataset

from avglab.core.weights import full_core_state
from avglab.data.datamodule import ShardDataModule
from avglab.data.synth.generator import ensure_synth_shards
from avglab.run import build_trainer, run
from avglab.training.build import build_core, synth_config

DATA = [
    "data.synth.n_train=100",  # 2 shards: one per rank
    "data.synth.n_val=100",
    "data.synth.n_test=4",
    "data.epoch_samples=16",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "stage.batch_size=2",
    "trainer.limit_val_batches=0",
    "trainer.accelerator=cpu",
    "router.k=4",
]


def make_cfg(workspace: Path, name: str, *overrides: str):
    return compose_stage(workspace, "instruct", "stage.previous=null", *DATA, *overrides, name=name)


def step_cfg(workspace: Path, name: str, *overrides: str):
    """One optimizer step on a global batch of 4 (stage.global_batch_size: accumulation from the world)."""
    return make_cfg(
        workspace,
        name,
        "stage.max_steps=1",
        "++stage.global_batch_size=4",
        "checkpoint_every=1000",
        *overrides,
    )


class FixedBatches(IterableDataset):
    """Micro batch i goes to process i % world: one process reads all of them in order."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def __iter__(self):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return iter(self.batches[rank::world])


def fixed_batches(cfg, tokenizer, image_processor, count: int) -> list[dict]:
    """The first ``count`` micro batches of the val split, identical on every process."""
    urls = ensure_synth_shards(synth_config(cfg.data), Path(cfg.data.root))
    data = ShardDataModule(
        {"val": urls["val"]},
        tokenizer,
        image_processor,
        cfg.data.template,
        batch_size=2,
        rank=0,
        world_size=1,
    )
    batches = []
    for batch in data.val_dataloader():
        batches.append(batch)
        if len(batches) == count:
            return batches
    raise AssertionError("not enough val samples")


def first_step(cfg, out: Path) -> None:
    """Fits one step on the fixed global batch; rank 0 writes the mean loss and the weights to ``out``."""
    L.seed_everything(cfg.seed)
    tokenizer, image_processor, core = build_core(cfg)
    batches = fixed_batches(cfg, tokenizer, image_processor, 2)
    stage_class = get_class(cfg.stage.module)

    class Recording(stage_class):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.seen.append(loss.detach())
            return loss

    module = Recording(core=core, stage=cfg.stage)
    module.seen = []
    module.train()
    trainer = build_trainer(cfg, Path(cfg.run_dir))
    trainer.fit(module, train_dataloaders=DataLoader(FixedBatches(batches), batch_size=None))
    loss = trainer.strategy.reduce(torch.stack(module.seen).mean(), reduce_op="mean")
    state = full_core_state(core, trainer)
    if trainer.is_global_zero:
        save_file(
            {
                **state,
                "_loss": loss.reshape(1),
                "_accumulation": torch.tensor([trainer.accumulate_grad_batches]),
            },
            out,
        )


def worker(workspace: Path) -> None:
    """What the 2 processes run (started by the test below)."""
    results = workspace / "results"
    two = ["trainer.devices=2"]
    first_step(step_cfg(workspace, "ddp-step", "strategy=ddp", *two), results / "ddp.safetensors")
    first_step(step_cfg(workspace, "fsdp2-step", "strategy=fsdp2", *two), results / "fsdp2.safetensors")
    fsdp2 = ["strategy=fsdp2", *two, "++stage.schedule=constant"]  # a cosine over 2 steps ends at lr 0
    train = run(make_cfg(workspace, "fsdp2-train", *fsdp2, "stage.max_steps=2", "checkpoint_every=2"))
    ckpt = f"ckpt_path={workspace}/runs/fsdp2-train/checkpoints/last.ckpt"
    run(make_cfg(workspace, "fsdp2-reload", *fsdp2, "stage.max_steps=2", ckpt))
    more = run(make_cfg(workspace, "fsdp2-more", *fsdp2, "stage.max_steps=3", "checkpoint_every=1", ckpt))
    if torch.distributed.get_rank() == 0:
        (results / "fsdp2_runs.json").write_text(json.dumps({"train": train, "more": more}))


def launch(workspace: Path, processes: int) -> list[tuple[int, str]]:
    """Starts this file's worker as ``processes`` ranks at once, as torchrun or SLURM would.

    Lightning finds LOCAL_RANK/WORLD_SIZE set and joins the ranks instead of re-executing the
    script for each (which would import everything one rank after the other).
    """
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(processes)}
    common.update(NODE_RANK="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # 2 ranks on 2 cores
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(workspace)],
            env={**os.environ, **common, "LOCAL_RANK": str(rank), "RANK": str(rank)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(processes)
    ]
    try:
        return [(p.wait(timeout=600), p.stderr.read()) for p in ranks]
    finally:
        for p in ranks:  # a failed rank leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """The one-process reference, then the 2-process script; returns the workspace."""
    ws = tmp_path_factory.mktemp("dist")
    (ws / "results").mkdir()
    first_step(step_cfg(ws, "single-step", "trainer.devices=1"), ws / "results" / "single.safetensors")
    results = launch(ws, processes=2)
    assert all(code == 0 for code, _ in results), "\n".join(err[-3000:] for _, err in results)
    return ws


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_one_process_on_the_same_global_batch(distributed, strategy):
    single = load_file(str(distributed / "results" / "single.safetensors"))
    multi = load_file(str(distributed / "results" / f"{strategy}.safetensors"))
    assert single.pop("_accumulation").item() == 2 and multi.pop("_accumulation").item() == 1
    assert torch.isfinite(single["_loss"]).all()
    torch.testing.assert_close(multi.pop("_loss"), single.pop("_loss"), rtol=1e-5, atol=1e-6)
    assert multi.keys() == single.keys()
    for key in single:  # the weights after the step: same gradient, same AdamW update
        torch.testing.assert_close(multi[key], single[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp2_saves_sharded_checkpoints_and_resumes_them_exactly(distributed):
    runs = json.loads((distributed / "results" / "fsdp2_runs.json").read_text())
    assert torch.isfinite(torch.tensor(runs["train"]["train/loss"]))
    assert torch.isfinite(torch.tensor(runs["more"]["train/loss"]))
    ckpt = distributed / "runs" / "fsdp2-train" / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and len(list(ckpt.glob("*.distcp"))) == 2  # one shard file per rank
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2
    saved = load_file(str(distributed / "runs" / "fsdp2-train" / "model" / "core.safetensors"))
    reloaded = load_file(str(distributed / "runs" / "fsdp2-reload" / "model" / "core.safetensors"))
    assert saved.keys() == reloaded.keys()
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    resumed = torch.load(
        distributed / "runs" / "fsdp2-more" / "checkpoints" / "last.ckpt" / "meta.pt", weights_only=True
    )
    assert resumed["global_step"] == 3
    trained = load_file(str(distributed / "runs" / "fsdp2-more" / "model" / "core.safetensors"))
    assert any(not torch.equal(saved[k], trained[k]) for k in saved)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
    # Leave together and tear the process group down before exit: a rank whose gloo threads are still
    # alive at interpreter shutdown can abort ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
