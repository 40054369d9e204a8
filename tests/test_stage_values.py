"""Bad stage values fail in run() before anything is built, naming the key and its range."""

import pytest
from stage_config import compose_stage

from avglab.run import run
from avglab.training.validation import ConfigValueError

SMALL = ["data.synth.n_train=8", "data.synth.n_val=4", "data.synth.n_test=2", "router.k=4"]

# (stage, override, text the message must hold: the key and the allowed range)
BAD = [
    ("pretrain", "stage.lr=-1", r"stage.lr=-1: must be a number > 0"),
    ("pretrain", "stage.lr=0", r"stage.lr=0: must be a number > 0"),
    ("instruct", "stage.lr_vision=0", r"stage.lr_vision=0: must be a number > 0 or null"),
    ("pretrain", "stage.batch_size=0", r"stage.batch_size=0: must be an integer >= 1 or null"),
    ("pretrain", "data.batch_size=0", r"data.batch_size=0: must be an integer >= 1"),
    ("eval", "stage.eval_batch_size=0", r"stage.eval_batch_size=0: must be an integer >= 1 or null"),
    ("instruct", "stage.global_batch_size=0", r"stage.global_batch_size=0: must be an integer >= 1 or null"),
    ("pretrain", "stage.warmup_ratio=5", r"stage.warmup_ratio=5: must be a number in \[0.0, 1.0\]"),
    ("pretrain", "stage.warmup_ratio=-0.1", r"stage.warmup_ratio=-0.1: must be a number in"),
    ("pretrain", "stage.max_steps=0", r"stage.max_steps=0: must be an integer >= 1"),
    ("pretrain", "stage.max_steps=-1", r"stage.max_steps=-1: must be an integer >= 1"),
    ("pretrain", "trainer.max_steps=0", r"trainer.max_steps=0: must be an integer >= 1"),
    ("pretrain", "stage.schedule=nonsense", r"stage.schedule='nonsense': choose one of \['linear', 'cosine'"),
    ("pretrain", "stage.weight_decay=-1", r"stage.weight_decay=-1: must be a number in \[0.0, inf\]"),
    ("pretrain", "stage.val_every=0", r"stage.val_every=0: must be an integer >= 1"),
    ("rglf_cached", "stage.cache_train_samples=0", r"stage.cache_train_samples=0: must be an integer >= 1"),
    ("rglf_cached", "stage.cache_batch_size=0", r"stage.cache_batch_size=0: must be an integer >= 1 or null"),
    ("eval", "stage.max_new_tokens=0", r"stage.max_new_tokens=0: must be an integer >= 1"),
    (
        "pretrain",
        "stage.granularity=20",
        r"stage.granularity=20: train at one of router.granularities \[4, 8",
    ),
]


@pytest.mark.parametrize(("stage", "override", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_value_fails_before_anything_is_built(tmp_path, stage, override, message):
    cfg = compose_stage(tmp_path, stage, *SMALL, override)
    with pytest.raises(ConfigValueError, match=message):
        run(cfg)
    run_dir = tmp_path / "runs" / stage
    assert not (run_dir / "model").exists() and not (run_dir / "checkpoints").exists()
    assert not (tmp_path / "stages").exists() and not (tmp_path / "data").exists()  # no data, no output


def test_null_still_means_the_other_key(tmp_path):
    """Only null falls back: stage.batch_size=null takes data.batch_size (checked, not refused)."""
    from avglab.training.validation import check_stage

    check_stage(compose_stage(tmp_path, "instruct", *SMALL, "stage.batch_size=null", "stage.lr_vision=null"))
