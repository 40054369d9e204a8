"""Text-only and mixed micro-batches (real processor and collate) through every stage that sees them.

Text-only samples carry no routing preference (METHOD pitfall 7): no ranking/CE term, no routing
histogram, but an answer in evaluation and the LM loss where the LLM trains. A micro-batch without
any image must give a finite loss whose graph reaches every trained parameter (DDP with
``find_unused_parameters=false`` needs a gradient for each of them on every rank).
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from modality_batches import LEVELS, build_llava, build_processor, build_tokenizer, modality_batch
from omegaconf import OmegaConf

import avglab.avg.feedback_cache as fc
from avglab.avg.router import GranularityRouter
from avglab.core.core_output import batch_rows
from avglab.core.model import AvgCore
from avglab.focus.build import build_focus_core
from avglab.stages.evaluate import EvalStage
from avglab.stages.focus import FocusStage
from avglab.stages.gumbel import GumbelStage
from avglab.stages.multigran import MultiGranularityStage
from avglab.stages.rglf import RglfStage
from avglab.stages.rglf_cached import CachedRglfStage

OPTIM = {"lr": 1e-3, "lr_vision": None, "weight_decay": 0.0, "warmup_ratio": 0.0}
RGLF = {
    "name": "rglf",
    "train": ["router"],
    "alpha": 0.1,
    "tie_eps": 0.0,
    "rank_weight": 1.0,
    "token_cost": 0.0,
    "token_cost_scale": "linear",
    **OPTIM,
}
FOCUS = {
    "kind": "both",
    "vision": {
        "window": 4,
        "branches": [[1, 1], [2, 2], [4, 4]],
        "scaling": "straight_through",
        "balance_alpha": 0.1,
        "balance_weights": None,
    },
    "text": {
        "layer": 0.25,
        "gamma": 0.85,
        "stochastic": True,
        "layer_range": [0.25, 0.75],
        "gamma_range": [0.7, 0.95],
    },
}
ALL_PARTS = ["vision", "projector", "newline", "llm", "router"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("words"))


@pytest.fixture(scope="module")
def llava(tokenizer):
    return build_llava(tokenizer)


@pytest.fixture(scope="module")
def processor(tokenizer, llava):
    return build_processor(tokenizer, llava)


def routed_core(llava) -> AvgCore:
    torch.manual_seed(0)
    return AvgCore(llava, LEVELS, GranularityRouter(128, LEVELS, k=3, num_heads=4))


def capture_logs(module) -> dict[str, float]:
    """Replaces ``module.log`` by a recorder (no Trainer needed); returns the recorded values."""
    logged: dict[str, float] = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    return logged


def backward_reaches_every_trained_parameter(module, loss: torch.Tensor) -> None:
    """Finite loss; after backward every trainable parameter has a (finite) gradient."""
    assert torch.isfinite(loss)
    module.zero_grad(set_to_none=True)
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient (DDP would stall): {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


# ----------------------------------------------------------------- stage 4: rglf
@pytest.mark.parametrize("token_cost", [0.0, 0.01])
def test_rglf_batch_without_image_is_a_zero_loss_over_the_router(llava, processor, token_cost):
    stage = RglfStage(routed_core(llava), OmegaConf.create({**RGLF, "token_cost": token_cost}))
    logged = capture_logs(stage)
    loss = stage.training_step(modality_batch(processor, "tt"), 0)
    assert loss.item() == 0.0 and loss.requires_grad
    backward_reaches_every_trained_parameter(stage, loss)
    assert all(p.grad.abs().sum() == 0 for p in stage.core.selector.parameters())
    assert stage.skipped == {"no_answer": 0, "tied": 0, "text_only": 2}
    assert "train/visual_tokens_routed_mean" not in logged and "train/router_picks_best" not in logged
    assert all(math.isfinite(v) for v in logged.values())


def test_rglf_mixed_batch_ranks_only_the_image_samples(llava, processor):
    mixed = modality_batch(processor, "itit")
    stage = RglfStage(routed_core(llava), OmegaConf.create(RGLF))
    logged = capture_logs(stage)
    logits, feedback, tokens = stage.routed(mixed)
    assert torch.isnan(feedback[[1, 3]]).all() and torch.isfinite(feedback[[0, 2]]).all()
    assert (tokens[[1, 3]] == 0).all() and (logits[[1, 3]] == 0).all()
    # the image samples' feedback is their own: scoring them alone gives the same numbers
    _, alone, _ = stage.routed(batch_rows(mixed, torch.tensor([0, 2])))
    assert torch.allclose(alone, feedback[[0, 2]], atol=1e-5)
    loss = stage.training_step(mixed, 0)
    backward_reaches_every_trained_parameter(stage, loss)
    assert stage.skipped["text_only"] == 2 and stage.skipped["tied"] == 0
    picked = tokens[[0, 2]].gather(1, logits[[0, 2]].argmax(-1, keepdim=True)).float().mean()
    assert logged["train/visual_tokens_routed_mean"] == pytest.approx(picked.item())


# ----------------------------------------------------------------- stage 4 from a feedback cache
def test_feedback_cache_keeps_text_only_samples_unscored_and_trains_on_them(llava, processor):
    core = routed_core(llava)
    batches = [
        modality_batch(processor, "it"),
        modality_batch(processor, "tt"),
        modality_batch(processor, "ii"),
    ]
    tensors, facts = fc.compute_cache(core, iter(batches), samples=6)
    cache = fc.FeedbackCache(tensors, facts)
    assert facts["text_only"] == 3 and cache.has_image.tolist() == [True, False, False, False, True, True]
    text = ~cache.has_image
    assert torch.isnan(cache.feedback[text]).all() and torch.isfinite(cache.feedback[~text]).all()
    assert (cache.tile_counts[text] == 0).all() and (cache.instruction_counts[text] == 0).all()
    stage = CachedRglfStage(
        core,
        OmegaConf.create(
            {
                **RGLF,
                "token_cost": 0.01,
                "cache_train_samples": 6,
                "cache_val_samples": 0,
            }
        ),
    )
    capture_logs(stage)
    text_only = fc.FeedbackCache.collate([cache[1], cache[2]])
    assert text_only["tiles"].shape[0] == 0
    loss = stage.training_step(text_only, 0)
    assert loss.item() == 0.0
    backward_reaches_every_trained_parameter(stage, loss)
    # a mixed cache batch gives the plain stage's logits and feedback for the same samples
    logits, feedback, _ = stage.routed(fc.FeedbackCache.collate([cache[0], cache[1]]))
    plain = RglfStage(core, stage.stage)
    plain_logits, plain_feedback, _ = plain.routed(batches[0])
    assert torch.allclose(logits, plain_logits, atol=1e-5)
    assert torch.allclose(feedback, plain_feedback, atol=1e-6, equal_nan=True)
    loss = stage.training_step(fc.FeedbackCache.collate([cache[i] for i in range(6)]), 0)
    backward_reaches_every_trained_parameter(stage, loss)
    assert stage.skipped["text_only"] == 5  # 2 from the text-only batch, 3 now


# ----------------------------------------------------------------- ablation (e): gumbel
@pytest.mark.parametrize("kinds", ["tt", "ti"])
def test_gumbel_batches_with_text_only_samples(llava, processor, kinds):
    stage = GumbelStage(
        routed_core(llava),
        OmegaConf.create({**OPTIM, "name": "gumbel", "train": ["router"], "tau": 1.0, "hard": True}),
    )
    logged = capture_logs(stage)
    batch = modality_batch(processor, kinds)
    out = stage.gated_forward(batch)
    assert out["levels"][0].item() == -1 and out["tokens"][0].item() == 0
    loss = stage.training_step(batch, 0)
    backward_reaches_every_trained_parameter(stage, loss)
    assert logged["train/text_only_total"] == kinds.count("t")
    shares = [v for k, v in logged.items() if k.startswith("train/router_share_")]
    assert sum(shares) == pytest.approx(1.0) if "i" in kinds else not shares


# ----------------------------------------------------------------- stage 3: multigran
def test_multigran_trains_the_llm_on_text_only_samples(llava, processor):
    stage = MultiGranularityStage(
        AvgCore(llava, LEVELS), OmegaConf.create({**OPTIM, "name": "multigran", "train": ALL_PARTS[:4]})
    )
    logged = capture_logs(stage)
    loss = stage.training_step(modality_batch(processor, "tt"), 0)
    assert loss.item() > 0  # the LM loss of the text-only answers
    backward_reaches_every_trained_parameter(stage, loss)
    assert set(logged) == {"train/loss", "train/ce_text_only"}
    mixed = modality_batch(processor, "it")
    stage.training_step(mixed, 0)
    scores, _, _ = stage.core.all_levels(mixed)
    assert logged["train/ce_level_4"] == pytest.approx(-scores[0, 0].item())  # image sample only
    assert logged["train/ce_text_only"] == pytest.approx(-scores[1, 0].item())


# ----------------------------------------------------------------- FocusLLaVA
def focus_stage(llava, kind: str) -> FocusStage:
    torch.manual_seed(0)
    core = build_focus_core(OmegaConf.create({**FOCUS, "kind": kind}), llava, LEVELS)
    return FocusStage(core, OmegaConf.create({**OPTIM, "name": "focus", "train": ALL_PARTS}))


@pytest.mark.parametrize("kind", ["vision", "text", "both"])
def test_focus_trains_on_text_only_and_mixed_batches(llava, processor, kind):
    stage = focus_stage(llava, kind).train()
    logged = capture_logs(stage)
    loss = stage.training_step(modality_batch(processor, "tt"), 0)
    backward_reaches_every_trained_parameter(stage, loss)
    assert logged["train/loss_balance"] == 0.0 and logged["train/visual_tokens_mean"] == 0.0
    loss = stage.training_step(modality_batch(processor, "ti"), 0)
    backward_reaches_every_trained_parameter(stage, loss)
    out = stage.core(modality_batch(processor, "ti"))
    assert out.answer_tokens[0] > 0 and out.visual_tokens[0] == 0 and out.levels[0] == -1


# ----------------------------------------------------------------- evaluation
def evaluate(core, tokenizer, batches, out_dir) -> dict:
    stage = EvalStage(core.eval(), tokenizer, out_dir, "router", max_new_tokens=3, latency_samples=3)
    for i, batch in enumerate(batches):
        stage.test_step(batch, i)
    stage.on_test_epoch_end()
    return stage.results


@pytest.mark.parametrize("focus", [None, "vision", "text", "both"])
def test_eval_answers_text_only_samples_and_counts_them_apart(llava, tokenizer, processor, tmp_path, focus):
    core = routed_core(llava) if focus is None else focus_stage(llava, focus).core
    batches = [modality_batch(processor, "tt"), modality_batch(processor, "itti")]
    results = evaluate(core, tokenizer, batches, tmp_path)
    for name, m in results.items():
        assert m["samples"] == 6 and m["text_only_samples"] == 4, name
        assert sum(m["granularity_histogram"].values()) in (0, 2), name  # focus: its own sampler
        assert "text" not in m["granularity_histogram_by_type"] or not any(
            m["granularity_histogram_by_type"]["text"].values()
        )
        assert m["latency_samples"] == 3 and math.isfinite(m["latency_ms"]["total"])
    if focus is None:
        assert sum(results["router"]["granularity_histogram"].values()) == 2
    records = stage_records(tmp_path)
    assert len(records) == 6 and sum(not r["has_image"] for r in records) == 4
    assert all(r["visual_tokens"] == 0 and r["level"] == -1 for r in records if not r["has_image"])


def stage_records(out_dir) -> list[dict]:
    """The selector's predictions.jsonl."""
    return [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------- sharded strategies
def test_sharded_strategy_stops_before_a_micro_batch_without_images(llava, processor):
    """FSDP2 units gather in collectives every rank enters; a text-only rank would skip the vision layers."""
    stage = MultiGranularityStage(
        AvgCore(llava, LEVELS), OmegaConf.create({**OPTIM, "name": "multigran", "train": ALL_PARTS[:4]})
    )
    text_only, mixed = modality_batch(processor, "tt"), modality_batch(processor, "ti")
    stage._trainer = SimpleNamespace(strategy=ModelParallelStrategy(), world_size=2, global_rank=1)
    stage.on_train_batch_start(mixed, 0)
    with pytest.raises(RuntimeError, match="strategy=ddp"):
        stage.on_train_batch_start(text_only, 0)
    loss = torch.tensor(1.0, requires_grad=True)
    assert stage.keep_in_graph(loss, text_only) is loss  # shards: no parameter sum outside a forward
    stage._trainer = SimpleNamespace(strategy=DDPStrategy(), world_size=2, global_rank=1)
    stage.on_train_batch_start(text_only, 0)  # DDP: the zero term keeps every parameter in the graph
    assert stage.keep_in_graph(loss, text_only) is not loss
