"""model=llava_next_vicuna_7b through a tiny random checkpoint written with save_pretrained: every stage,
export and reload, offline errors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from stage_config import compose_config, compose_stage
from transformers import AutoProcessor, LlavaNextForConditionalGeneration

from avglab.core.hub import CheckpointNotFoundError
from avglab.core.tiny_checkpoint import TINY_OVERRIDES, write_tiny_checkpoint
from avglab.data.synth.generator import synth_vocabulary
from avglab.run import run
from avglab.tools.export import load_pretrained
from avglab.tools.export import main as export_main
from avglab.training.build import build_core, synth_config

FAST = [
    "data.synth.n_train=24",
    "data.synth.n_val=4",
    "data.synth.n_test=2",
    "data.batch_size=4",
    "data.eval_batch_size=2",
    "stage.max_steps=1",
    "stage.val_every=1",
    "trainer.limit_val_batches=0",
    "checkpoint_every=1",
    "router.k=4",
]


def make_cfg(workspace: Path, checkpoint: Path, stage: str, *overrides: str, tag: str = ""):
    model = ["model=llava_next_vicuna_7b", f"model.path={checkpoint}", *TINY_OVERRIDES]
    short_eval = ["stage.compare_fixed=false", "stage.max_new_tokens=2"] if stage == "eval" else []
    return compose_stage(workspace, stage, *model, *FAST, *short_eval, *overrides, tag=tag)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny checkpoint folder, then stages 1-4 and evaluation loaded from it."""
    ws = tmp_path_factory.mktemp("ckpt")
    offline = pytest.MonkeyPatch()
    offline.setenv("HF_HUB_OFFLINE", "1")  # everything below must load from local folders
    data = compose_config(f"workspace={ws}").data
    checkpoint = write_tiny_checkpoint(ws / "tiny-llava-next", synth_vocabulary(synth_config(data)), seed=1)
    results = {
        stage: run(make_cfg(ws, checkpoint, stage)) for stage in ("pretrain", "instruct", "multigran", "rglf")
    }
    results["eval"] = run(make_cfg(ws, checkpoint, "eval"))
    yield ws, checkpoint, results
    offline.undo()


def test_every_stage_runs_from_the_checkpoint_folder(chain):
    ws, _, results = chain
    for stage in ("pretrain", "instruct", "multigran", "rglf"):
        assert torch.isfinite(torch.tensor(results[stage]["train/loss"])), stage
        assert (ws / "runs" / stage / "model" / "core.safetensors").exists()
        assert (ws / "runs" / stage / "model" / "config.yaml").exists()
    assert results["eval"]["samples"] == 2
    # stage 1 trains the projector only (METHOD 1.3): the checkpoint's LLM is untouched
    assert results["pretrain"]["params/trainable"] < results["instruct"]["params/trainable"]


def test_weights_tokenizer_and_processor_come_from_the_checkpoint(chain):
    ws, checkpoint, _ = chain
    tokenizer, image_processor, core = build_core(make_cfg(ws, checkpoint, "pretrain"))
    reference = LlavaNextForConditionalGeneration.from_pretrained(checkpoint)
    ours = core.llava.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items())
    assert tokenizer.image_token == "<image>"
    assert tokenizer.convert_tokens_to_ids("<image>") == core.config.image_token_id
    assert tokenizer.get_vocab() == AutoProcessor.from_pretrained(checkpoint).tokenizer.get_vocab()
    assert image_processor.crop_size["height"] == 64
    assert [list(p) for p in image_processor.image_grid_pinpoints] == core.config.image_grid_pinpoints


def test_router_is_fresh_unless_a_router_checkpoint_is_given(chain):
    ws, checkpoint, _ = chain
    trained = {
        k[len("selector.") :]: v
        for k, v in load_file(str(ws / "runs" / "rglf" / "model" / "core.safetensors")).items()
        if k.startswith("selector.")
    }
    _, _, fresh = build_core(make_cfg(ws, checkpoint, "rglf"))
    assert any(not torch.equal(fresh.selector.state_dict()[k], v) for k, v in trained.items())
    from avglab.core.weights import load_router

    assert load_router(fresh, ws / "runs" / "rglf" / "model") == len(trained)
    assert all(torch.equal(fresh.selector.state_dict()[k], v) for k, v in trained.items())


def test_export_writes_safetensors_only_and_reloads_bit_exactly(chain, tmp_path):
    ws, _, _ = chain
    out = tmp_path / "export"
    export_main([str(ws / "runs" / "rglf"), str(out)])
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "avglab.safetensors" in names and "avglab.json" in names
    assert all(n.endswith((".json", ".safetensors", ".jinja", ".txt", ".model")) for n in names), names
    saved = load_file(str(ws / "runs" / "rglf" / "model" / "core.safetensors"))
    _, _, core = load_pretrained(out)
    state = core.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) and state[k].dtype == saved[k].dtype for k in saved)
    assert isinstance(
        LlavaNextForConditionalGeneration.from_pretrained(out), LlavaNextForConditionalGeneration
    )
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "LlavaNextProcessor"
    meta = json.loads((out / "avglab.json").read_text())
    assert meta["granularities"] == [4, 8, 16, 32, 64] and meta["config"]["router"]["kind"] == "avg"
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main([str(ws / "runs" / "rglf"), str(out)])


def test_exported_folder_runs_through_hydra_with_its_router(chain, tmp_path):
    ws, _, _ = chain
    out = tmp_path / "export"
    export_main([str(ws / "runs" / "rglf" / "model"), str(out)])
    cfg = make_cfg(ws, out, "eval", f"model.router_from={out}", "stage.previous=null", tag="-export")
    metrics = run(cfg)
    assert metrics["samples"] == 2
    saved = load_file(str(ws / "runs" / "rglf" / "model" / "core.safetensors"))
    _, _, core = build_core(cfg)
    from avglab.core.weights import load_router

    load_router(core, out)
    assert all(torch.equal(core.state_dict()[k], v) for k, v in saved.items())


def test_resume_checkpoints_load_without_pickle(chain):
    ws, checkpoint, _ = chain
    ckpt = ws / "runs" / "pretrain" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] == 1
    metrics = run(
        make_cfg(ws, checkpoint, "pretrain", "stage.max_steps=2", f"ckpt_path={ckpt}", tag="-resumed")
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def test_missing_hub_checkpoint_offline_says_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = compose_config("model=llava_next_vicuna_7b", f"workspace={tmp_path}")
    with pytest.raises(CheckpointNotFoundError) as err:
        build_core(cfg)
    message = str(err.value)
    assert "hf download llava-hf/llava-v1.6-vicuna-7b-hf --local-dir" in message
    assert "model.path=" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_folder_names_what_it_needs(tmp_path):
    missing = f"model.path={tmp_path}/nowhere"
    cfg = compose_config("model=llava_next_vicuna_7b", missing, f"workspace={tmp_path}")
    with pytest.raises(CheckpointNotFoundError, match="config.json"):
        build_core(cfg)


def test_geometry_that_disagrees_with_the_checkpoint_names_the_override(chain):
    ws, checkpoint, _ = chain
    with pytest.raises(ValueError, match=r"set model.tile_size=64"):
        build_core(make_cfg(ws, checkpoint, "pretrain", "model.tile_size=336"))


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("flash_attn") is not None, reason="flash-attn is installed here"
)
def test_flash_attention_without_the_package_says_how_to_install(chain):
    ws, checkpoint, _ = chain
    with pytest.raises(ImportError, match="pip install flash-attn"):
        build_core(make_cfg(ws, checkpoint, "pretrain", "model.attn_implementation=flash_attention_2"))
