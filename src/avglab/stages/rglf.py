"""Stage 4: RGLF, ranking granularities to align with LMM feedback (Eqs. 4-9); router only."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from avglab.model.core import AvgCore
from avglab.model.losses import apply_token_cost, rglf_loss
from avglab.stages.base import StageModule


class RglfStage(StageModule):
    """Trains the router on the frozen LMM's per-granularity answer scores.

    Args:
        core: the shared core; its selector must be a trainable router.
        stage: stage config: alpha, tie_eps, token_cost and token_cost_scale (an optional price on
            visual tokens subtracted from the feedback; 0 = the paper), rank_weight (1 = the paper,
            0 = Table 4 ablation (f)) and the optimizer settings.

    Subclasses change where router inputs and feedback come from by overriding :meth:`routed`
    (``stage=rglf_cached`` reads them from a feedback cache); the loss and its logging are shared.
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        if core.selector is None or not any(True for _ in core.selector.parameters()):
            raise ValueError(
                "stage=rglf trains a router: use router=avg or router=image_only, not fixed/random"
            )
        super().__init__(core, stage)
        self.token_cost = stage.token_cost
        self.token_cost_scale = stage.token_cost_scale
        self.skipped = {"no_answer": 0, "tied": 0}

    def priced(self, feedback: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Feedback (B, N) after the configured price on the (B, N) visual tokens."""
        return apply_token_cost(feedback, tokens, self.token_cost, self.token_cost_scale)

    @torch.no_grad()
    def feedback(self, batch: dict):
        """One vision pass and one batched LLM pass over all N levels (Eq. 4), no gradient.

        Returns:
            The encoded pyramid (reused as router input), feedback r (B, N) after the optional
            token cost, and the (B, N) visual token counts per level.
        """
        encoded = self.core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        scores, _, _ = self.core.all_levels(batch, encoded)
        tokens = self.core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu()).to(
            scores.device
        )
        return encoded, self.priced(scores, tokens), tokens

    def routed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (B, N) with grad, feedback r (B, N) after the token cost, tokens (B, N)."""
        encoded, feedback, tokens = self.feedback(batch)
        logits = self.core.selector(
            self.core.router_input(encoded, batch["input_ids"], batch["instruction_mask"])
        )
        return logits, feedback, tokens

    def rglf_step(self, batch: dict, split: str) -> torch.Tensor:
        """Eq. 9 on one batch, with routing statistics."""
        logits, feedback, tokens = self.routed(batch)
        loss = rglf_loss(
            logits,
            feedback,
            alpha=self.stage.alpha,
            tie_eps=self.stage.tie_eps,
            rank_weight=self.stage.get("rank_weight", 1.0),
        )
        size = len(logits)
        no_answer = int((~torch.isfinite(feedback).all(dim=1)).sum())
        tied = int((~loss.usable).sum()) - no_answer
        if split == "train":
            self.skipped["no_answer"] += no_answer
            self.skipped["tied"] += tied
            self.log("train/skipped_no_answer_total", float(self.skipped["no_answer"]), batch_size=size)
            self.log("train/tied_total", float(self.skipped["tied"]), batch_size=size)
        chosen = logits.argmax(-1)
        usable = loss.ce_usable
        self.log(f"{split}/loss", loss.total, prog_bar=True, batch_size=size)
        self.log(f"{split}/loss_rank", loss.rank, batch_size=size)
        self.log(f"{split}/loss_ce", loss.ce, batch_size=size)
        if usable.any():
            agree = (chosen[usable] == loss.best[usable]).float().mean()
            self.log(f"{split}/router_picks_best", agree, prog_bar=True, batch_size=size)
        picked_tokens = tokens.gather(1, chosen[:, None]).float()
        self.log(f"{split}/visual_tokens_routed_mean", picked_tokens.mean(), batch_size=size)
        log_every = self.trainer.log_every_n_steps if self._trainer is not None else 0
        if split == "train" and self.logger is not None and log_every and self.global_step % log_every == 0:
            writer = self.logger.experiment  # SummaryWriter: per-sample routing and token counts
            writer.add_histogram("train/router_choice_level", chosen.float(), self.global_step)
            writer.add_histogram("train/visual_tokens_per_sample", picked_tokens.flatten(), self.global_step)
        return loss.total

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.rglf_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.rglf_step(batch, "val")
