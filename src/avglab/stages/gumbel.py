"""Table 4 ablation (e): the router trained through the LMM loss with Gumbel-Softmax, not RGLF.

The router's logits z (B, N) are perturbed with Gumbel noise and relaxed:
``y_soft = softmax((z + g) / tau)``; the LLM is fed the one granularity ``argmax y`` (one LLM
pass, as at inference), and the straight-through estimator ``y = one_hot - y_soft.detach() +
y_soft`` gates that level's visual tokens: their values are unchanged (the gate is exactly 1)
while d(answer CE)/d(gate) reaches the router through d y_soft / d z. Everything but the router
stays frozen (as in stage 4), so the loss is the answer cross-entropy of Eq. 2 through a frozen
LMM; there is no ranking or token term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from avglab.core.model import AvgCore
from avglab.stages.base import StageModule


def straight_through_gumbel(
    logits: torch.Tensor, tau: float, hard: bool = True, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Gumbel-Softmax sample with a straight-through one-hot (``hard``) or the soft relaxation.

    Args:
        logits: (B, N) router logits.
        tau: temperature (> 0).
        hard: one-hot forward values with the soft gradient; else the soft sample itself.
        generator: noise source (the global one when None).

    Returns:
        (B, N) selection weights; rows sum to 1.
    """
    if tau <= 0:
        raise ValueError(f"stage.tau={tau}: the Gumbel-Softmax temperature must be > 0")
    uniform = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))  # Gumbel(0, 1) noise
    soft = F.softmax((logits.float() + gumbel) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft)
    return one_hot - soft.detach() + soft  # value one_hot, gradient of soft (straight through)


class GumbelStage(StageModule):
    """Router-only training through the frozen LMM's answer loss (ablation (e)).

    Args:
        core: the shared core; its selector must be a trainable router.
        stage: ``stage=gumbel``: tau (temperature), hard (straight-through one-hot) and the
            optimizer settings; ``train`` must be ``[router]``.
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        if core.selector is None or not any(True for _ in core.selector.parameters()):
            raise ValueError("stage=gumbel trains a router: use router=avg or router=image_only")
        if list(stage.train) != ["router"]:
            raise ValueError(f"stage.train={list(stage.train)}: stage=gumbel trains the router only")
        super().__init__(core, stage)
        if stage.tau <= 0:
            raise ValueError(f"stage.tau={stage.tau}: the Gumbel-Softmax temperature must be > 0")
        self.text_only = 0  # text-only training samples so far (not routed)

    def gated_forward(self, batch: dict, hard: bool | None = None) -> dict:
        """One vision pass (no grad), router, Gumbel selection, one LLM pass with gated tokens.

        Text-only samples get the answer CE through the frozen LMM like any other but no
        granularity (level -1, no gate); without any image the router still runs (zero logits over
        its parameters, ``GranularityRouter.no_tile_logits``) and the step's loss does not depend on it.

        Returns:
            loss (answer CE, token mean), levels (B,) (-1 without image), weights (B, N), tokens (B,)
            visual tokens.
        """
        core = self.core
        with torch.no_grad():  # frozen vision tower and projector (pitfall 6: one vision pass)
            encoded = core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        logits = core.selector(core.router_input(encoded, batch["input_ids"], batch["instruction_mask"]))
        weights = straight_through_gumbel(logits, self.stage.tau, self.stage.hard if hard is None else hard)
        levels = weights.argmax(-1).cpu()
        visual = core.pack(encoded, batch["image_sizes"], levels)
        gate = weights.gather(1, levels.to(weights.device)[:, None])[:, 0]  # (B,) == 1 when hard
        gated = [v if v is None else v * gate[i].to(v.dtype) for i, v in enumerate(visual)]
        spliced = core.splice(batch["input_ids"], batch["attention_mask"], gated, batch["labels"])
        _, _, loss = core.score(spliced)
        tokens = torch.tensor([0 if v is None else len(v) for v in visual], dtype=torch.float)
        levels = torch.where(batch["has_image"].cpu(), levels, torch.full_like(levels, -1))
        return {"loss": loss, "levels": levels, "weights": weights, "tokens": tokens}

    def step(self, batch: dict, split: str) -> torch.Tensor:
        """Answer CE through the gated tokens; routing shares and tokens over the samples with an image."""
        out = self.gated_forward(batch)
        size = self.batch_size(batch)
        self.log(f"{split}/loss", out["loss"], prog_bar=True, batch_size=size)
        routed = out["levels"] >= 0  # text-only samples carry no routing preference (pitfall 7)
        if split == "train":
            self.text_only += int((~routed).sum())
            self.log("train/text_only_total", float(self.text_only), batch_size=size)
        if routed.any():
            count = int(routed.sum())
            self.log(f"{split}/visual_tokens_routed_mean", out["tokens"][routed].mean(), batch_size=count)
            for level, g in enumerate(self.core.scaler.granularities):
                share = (out["levels"][routed] == level).float().mean()
                self.log(f"{split}/router_share_{g}", share, batch_size=count)
        return out["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.keep_in_graph(self.step(batch, "train"), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.step(batch, "val")
