"""Stage 4: RGLF, ranking granularities to align with LMM feedback (Eqs. 4-9); router only."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from avglab.avg.losses import apply_token_cost, rglf_loss
from avglab.core.model import AvgCore
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
        self.skipped = {"no_answer": 0, "tied": 0, "text_only": 0}

    def priced(self, feedback: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Feedback (B, N) after the configured price on the (B, N) visual tokens."""
        return apply_token_cost(feedback, tokens, self.token_cost, self.token_cost_scale)

    @torch.no_grad()
    def feedback(self, batch: dict):
        """One vision pass and one batched LLM pass over all N levels (Eq. 4), no gradient.

        Only samples with an image are scored (``AvgCore.level_feedback``): a text-only sample's
        levels tie (pitfall 7), its row is NaN and the LLM never runs for a batch without images.

        Returns:
            The encoded pyramid (reused as router input), feedback r (B, N) after the optional
            token cost, and the (B, N) visual token counts per level.
        """
        encoded = self.core.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        scores = self.core.level_feedback(batch, encoded)
        tokens = self.core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu()).to(
            scores.device
        )
        return encoded, self.priced(scores, tokens), tokens

    def routed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (B, N) with grad, feedback r (B, N) after the token cost, tokens (B, N).

        Text-only samples get zero logits; a batch without any image gets zero logits that still
        depend on every router parameter (``GranularityRouter.no_tile_logits``).
        """
        encoded, feedback, tokens = self.feedback(batch)
        logits = self.core.selector(
            self.core.router_input(encoded, batch["input_ids"], batch["instruction_mask"])
        )
        return logits, feedback, tokens

    def rglf_step(self, batch: dict, split: str) -> torch.Tensor:
        """Eq. 9 on one batch, with routing statistics over the samples that have an image.

        Text-only samples carry no routing preference (pitfall 7): their feedback is NaN whatever
        the source, so they add nothing to the ranking or CE term, and they are counted as
        ``text_only``, not as routed. A batch without any image gives an exact zero loss that is
        still a graph over the router, never NaN and never None (which would desynchronise DDP).
        """
        logits, feedback, tokens = self.routed(batch)
        has_image = batch["has_image"].to(logits.device).bool()
        feedback = torch.where(has_image[:, None], feedback, torch.full_like(feedback, float("nan")))
        loss = rglf_loss(
            logits,
            feedback,
            alpha=self.stage.alpha,
            tie_eps=self.stage.tie_eps,
            rank_weight=self.stage.get("rank_weight", 1.0),
        )
        size = len(logits)
        scored = torch.isfinite(feedback).all(dim=1)
        text_only = int((~has_image).sum())
        no_answer = int((has_image & ~scored).sum())
        tied = int((scored & ~loss.usable).sum())
        if split == "train":
            for reason, count in (("no_answer", no_answer), ("tied", tied), ("text_only", text_only)):
                self.skipped[reason] += count
            self.log("train/skipped_no_answer_total", float(self.skipped["no_answer"]), batch_size=size)
            self.log("train/tied_total", float(self.skipped["tied"]), batch_size=size)
            self.log("train/text_only_total", float(self.skipped["text_only"]), batch_size=size)
        self.log(f"{split}/loss", loss.total, prog_bar=True, batch_size=size)
        self.log(f"{split}/loss_rank", loss.rank, batch_size=size)
        self.log(f"{split}/loss_ce", loss.ce, batch_size=size)
        self.log_routing(logits, tokens, loss, has_image, split)
        return loss.total

    def log_routing(
        self, logits: torch.Tensor, tokens: torch.Tensor, loss, has_image: torch.Tensor, split: str
    ) -> None:
        """Agreement with the feedback's best level, routed tokens and histograms, over image samples.

        Args:
            logits: (B, N) router logits.
            tokens: (B, N) visual tokens per level.
            loss: the ``RglfLoss`` of the batch.
            has_image: (B,) bool; text-only samples are left out (their zero logits pick nothing).
            split: "train" or "val".
        """
        routed = int(has_image.sum())
        if not routed:
            return
        chosen = logits.argmax(-1)
        usable = loss.ce_usable
        if usable.any():
            agree = (chosen[usable] == loss.best[usable]).float().mean()
            self.log(f"{split}/router_picks_best", agree, prog_bar=True, batch_size=int(usable.sum()))
        picked_tokens = tokens.gather(1, chosen[:, None])[:, 0][has_image].float()
        self.log(f"{split}/visual_tokens_routed_mean", picked_tokens.mean(), batch_size=routed)
        log_every = self.trainer.log_every_n_steps if self._trainer is not None else 0
        if split == "train" and self.logger is not None and log_every and self.global_step % log_every == 0:
            writer = self.logger.experiment  # SummaryWriter: per-sample routing and token counts
            writer.add_histogram("train/router_choice_level", chosen[has_image].float(), self.global_step)
            writer.add_histogram("train/visual_tokens_per_sample", picked_tokens, self.global_step)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.keep_in_graph(self.rglf_step(batch, "train"), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.rglf_step(batch, "val")
