"""Table 4 (e): the straight-through Gumbel-Softmax stage trains the router through the frozen LMM."""

import pytest
import torch
from omegaconf import OmegaConf

from avglab.core.model import AvgCore
from avglab.core.selector import FixedSelector
from avglab.stages.gumbel import GumbelStage, straight_through_gumbel

STAGE = {
    "name": "gumbel",
    "train": ["router"],
    "tau": 1.0,
    "hard": True,
    "lr": 1e-3,
    "lr_vision": None,
    "weight_decay": 0.0,
    "warmup_ratio": 0.0,
}


def test_straight_through_sample_is_one_hot_with_a_soft_gradient():
    logits = torch.tensor([[0.2, 1.0, -0.5], [0.0, 0.0, 3.0]], requires_grad=True)
    weights = straight_through_gumbel(logits, tau=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(weights.detach().sum(-1), torch.ones(2))
    assert set(weights.detach().flatten().tolist()) <= {0.0, 1.0}
    (weights * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_gradients_reach_the_router_and_nothing_else(routed_core, batch):
    stage = GumbelStage(routed_core, OmegaConf.create(STAGE))
    torch.manual_seed(0)
    out = stage.gated_forward(batch)
    out["loss"].backward()
    router_grads = [p.grad for p in routed_core.selector.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in router_grads)
    assert all(p.grad is None for p in routed_core.llava.parameters())


def test_the_gate_does_not_change_what_the_llm_sees(routed_core, batch):
    """Forward values equal an ungated pass at the chosen levels: the gate is exactly 1."""
    stage = GumbelStage(routed_core, OmegaConf.create(STAGE))
    torch.manual_seed(0)
    out = stage.gated_forward(batch)
    with torch.no_grad():
        encoded = routed_core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        visual = routed_core.pack(encoded, batch["image_sizes"], out["levels"])
        spliced = routed_core.splice(batch["input_ids"], batch["attention_mask"], visual, batch["labels"])
        _, _, loss = routed_core.score(spliced)
    assert out["loss"].item() == pytest.approx(loss.item(), rel=1e-6)


def test_gumbel_needs_a_trainable_router_and_a_positive_tau(llava, routed_core):
    with pytest.raises(ValueError, match="stage=gumbel trains a router"):
        GumbelStage(AvgCore(llava, [4, 8, 16, 32, 64], FixedSelector(5, 4)), OmegaConf.create(STAGE))
    with pytest.raises(ValueError, match="stage.tau"):
        GumbelStage(routed_core, OmegaConf.create({**STAGE, "tau": 0.0}))
    with pytest.raises(ValueError, match="stage.train"):
        GumbelStage(routed_core, OmegaConf.create({**STAGE, "train": ["router", "llm"]}))
