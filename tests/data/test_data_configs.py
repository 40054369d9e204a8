"""The data configs compose, resolve paths from AVGLAB_DATA and build a datamodule over converted shards."""

import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from stage_config import compose_config

from avglab.cli import CONFIG_DIR
from avglab.training.build import build_datamodule

DATA_CONFIGS = sorted(p.stem for p in (Path(CONFIG_DIR) / "data").glob("*.yaml"))


make_cfg = compose_config


def test_every_data_config_composes_with_the_same_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("AVGLAB_DATA", str(tmp_path / "datasets"))
    assert {"synth", "llava_pretrain", "llava_instruct", "eval_textvqa"} <= set(DATA_CONFIGS)
    keys = None
    for name in DATA_CONFIGS:
        data = make_cfg(f"data={name}", f"workspace={tmp_path}").data
        resolved = OmegaConf.to_container(data, resolve=True)
        own = set(resolved) - {"synth"}
        keys = keys or own
        assert own == keys, name
        if name == "shards":  # the user's own set: no default place, data.root is required
            assert resolved["kind"] == "shards" and resolved["root"] == "???"
        elif name != "synth":
            assert resolved["kind"] == "shards" and resolved["root"].startswith(str(tmp_path / "datasets"))
    pretrain = make_cfg("data=llava_pretrain", "stage=pretrain").data
    assert pretrain.template == "plain" and pretrain.train_shards == "train-*.tar"
    assert make_cfg("data=llava_instruct").data.template == "vicuna_v1"
    assert make_cfg("data=eval_textvqa").data.max_skip_fraction == 0.0
    assert make_cfg("data.max_skip_fraction=0.2").data.max_skip_fraction == 0.2  # synth takes it too
    monkeypatch.delenv("AVGLAB_DATA")
    fallback = make_cfg("data=llava_pretrain", f"workspace={tmp_path}").data.root
    assert fallback == f"{tmp_path}/data/llava_pretrain"


def test_build_datamodule_reads_converted_shards(
    llava_shards, monkeypatch, tmp_path, tokenizer, image_processor
):
    monkeypatch.setenv("AVGLAB_DATA", str(tmp_path))
    overrides = ["data=llava_instruct", "data.num_workers=0", "data.batch_size=4", f"workspace={tmp_path}"]
    with pytest.raises(FileNotFoundError, match="python -m avglab.data.convert"):
        build_datamodule(make_cfg(*overrides), tokenizer, image_processor)
    shutil.copytree(llava_shards[0], tmp_path / "llava_instruct")
    dm = build_datamodule(make_cfg(*overrides), tokenizer, image_processor)
    assert set(dm.urls) == {"train"} and len(dm.urls["train"]) == 8 and dm.split_size("train") == 24
    assert dm.val_dataloader() == []
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and dm.budget.max_fraction == 0.01


def test_the_synth_question_kinds_are_set_from_the_command_line():
    from avglab.data.synth.config import SynthConfig
    from avglab.training.build import synth_config

    default = synth_config(compose_config().data)
    assert default.question_kinds == SynthConfig().question_kinds
    assert default.digest() == SynthConfig().digest()  # listing the default kinds keeps the default set
    kinds = "[background_color,shape,shape_color,marker_color]"
    assert "shape" in synth_config(compose_config(f"data.synth.question_kinds={kinds}").data).question_kinds
