"""A run a user can watch and read: progress lines, validation history, stage.monitor, no own warnings."""

import json
import logging
import warnings

import pytest
import torch
from safetensors.torch import load_file
from stage_config import compose_stage
from userdata import user_llava_shards  # noqa: F401 - the session fixture

from avglab.run import run

SYNTH = ["data.synth.n_train=48", "data.synth.n_val=8", "data.synth.n_test=8"]
SMALL = [
    "data.batch_size=4",
    "data.eval_batch_size=4",
    "stage.batch_size=4",
    "stage.global_batch_size=null",
    "trainer.limit_val_batches=1",
    "progress=log",
]
TINY = SYNTH + SMALL


def progress_lines(caplog, prefix: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]


def test_training_logs_progress_every_n_steps_once_and_records_the_step_and_best_validation(tmp_path, caplog):
    cfg = compose_stage(
        tmp_path, "pretrain", *TINY, "stage.max_steps=6", "stage.val_every=3", "progress_every=2"
    )
    with caplog.at_level(logging.INFO, logger="avglab"):
        metrics = run(cfg)
    steps = progress_lines(caplog, "step ")
    assert [line.split()[1] for line in steps] == ["2/6", "4/6", "6/6"]  # each once, in order
    for line in steps:
        assert all(word in line for word in ("loss ", "lr ", "samples/s ", "ETA "))
    assert len(progress_lines(caplog, "validation at step ")) == 2  # steps 3 and 6
    saved = json.loads((tmp_path / "runs" / "pretrain" / "metrics.json").read_text())
    assert saved["step"] == 6 and metrics["step"] == 6
    best = saved["best_val"]
    assert best["step"] in (3, 6) and "val/loss" in best
    assert best["val/loss"] <= saved["val/loss"] + 1e-9  # the best validation, not only the last


def test_monitor_stops_early_and_the_stage_output_is_the_best_checkpoint(tmp_path):
    # mode=max on a falling loss: the first validation is the best, so early stopping (patience 1) ends
    # the run one validation later and the best checkpoint is not the last step's weights.
    monitor = ["stage.monitor=val/loss", "stage.monitor_mode=max", "stage.patience=1", "stage.lr=1e-2"]
    cfg = compose_stage(tmp_path, "pretrain", *TINY, "stage.max_steps=12", "stage.val_every=2", *monitor)
    metrics = run(cfg)
    source = metrics["stage_output_from"]
    assert metrics["step"] == 4 < 12  # stopped by EarlyStopping after one validation without improvement
    assert source["step"] == 2 == metrics["best_val"]["step"]
    best = torch.load(source["path"], map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(tmp_path / "runs/pretrain/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    output = load_file(tmp_path / "runs" / "pretrain" / "model" / "core.safetensors")
    name = next(k for k in output if "multi_modal_projector" in k)
    assert torch.equal(output[name], best[f"core.{name}"])
    assert not torch.equal(output[name], last["state_dict"][f"core.{name}"])


@pytest.mark.parametrize("value", ["val/loss", "loss"])
def test_monitor_values_are_checked_before_any_model(tmp_path, value):
    cfg = compose_stage(tmp_path, "pretrain", *TINY, f"stage.monitor={value}", "stage.monitor_mode=up")
    with pytest.raises(ValueError, match="stage.monitor"):
        run(cfg)


def test_a_run_without_validation_split_warns_nothing_of_its_own(tmp_path, user_llava_shards):  # noqa: F811
    cfg = compose_stage(
        tmp_path,
        "pretrain",
        "data=shards",
        f"data.root={user_llava_shards.root}",
        "data.val_shards=absent-*.tar",  # an optional split that matches nothing: no validation
        *SMALL,
        "stage.max_steps=2",
        "stage.val_every=1",
        "stage.train=[projector]",  # the LLM frozen upstream of a trained part: the checkpointing check
        "model.gradient_checkpointing=true",  # turned on by transformers' current name
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg)
    library_noise = ("across ranks is zero", "LeafSpec", "past_key_values", "gradient_checkpointing")
    assert not [str(w.message) for w in caught if any(n in str(w.message) for n in library_noise)]


def test_evaluation_logs_progress_every_n_batches(tmp_path, caplog):
    cfg = compose_stage(
        tmp_path,
        "eval",
        *SYNTH,
        "stage.previous=null",
        "router=fixed",
        "stage.eval_batch_size=4",
        "stage.latency_samples=0",
        "stage.max_new_tokens=2",
        "progress=log",
        "progress_every=1",
    )
    with caplog.at_level(logging.INFO, logger="avglab"), caplog.at_level(logging.INFO, logger="lightning"):
        run(cfg)
    assert not progress_lines(caplog, "`Trainer(val_check_interval")  # an evaluation validates nothing
    lines = progress_lines(caplog, "eval batch ")
    expected = ["eval batch 1 (4/8 samples, 50%)", "eval batch 2 (8/8 samples, 100%)"]
    assert [line.split(" samples/s")[0] for line in lines] == expected
