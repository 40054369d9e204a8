"""Stage 1 with an answer read-out (probe only): the visual tokens the LLM looks at must name the answer.

``stage.module=readout_stage.ReadoutPretrainStage model.attn_implementation=eager`` with
``PYTHONPATH=experiments/spatial``; keys ``+stage.readout_weight`` (1), ``+stage.readout_layer`` (-1),
``+stage.readout_tokens`` (all | final). Measured in experiments/spatial/README.md (fifth session): it
does not teach the tower shape in stage 1's budget, so it is not part of avglab.

A vision tower trained from random weights by the answer loss alone learns what one patch shows (colour)
fast and what an object's patches show together (shape) slowly: the answer's gradient reaches the tower
only through an LLM whose read-out of those features is itself still forming. Given a tower that already
knows shape, the same stage 1 learns shape questions in a few hundred steps, and a linear head on an
object's mean token teaches the tower shape as fast as per-patch labels do (the README).

This stage adds that shallow path. At every supervised answer token, the LLM's own attention (layer
``readout_layer``, summed over heads, renormalised over the image's visual tokens, detached) pools the
visual tokens it reads; a linear head predicts the answer token from the pooled embedding; the stage adds
``readout_weight`` times that cross-entropy to the answer loss. The attention decides which object a
question is about; the head asks that object's tokens to carry the answer. No labels beyond the answers.

The head is the stage's own: the stage output and every later stage are plain LLaVA-NeXT weights. It
needs the attention weights, so the LLM must run eager attention (``model.attn_implementation=eager``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from avglab.core.model import AvgCore
from avglab.stages.pretrain import PretrainStage


def visual_spans(input_ids: torch.Tensor, visual_tokens: torch.Tensor, image_token_id: int, length: int):
    """(E, S) bool mask of the positions that hold visual tokens after splicing (right-padded rows).

    Args:
        input_ids: (E, L) ids with one ``<image>`` placeholder per image row.
        visual_tokens: (E,) visual tokens spliced in per row (0: no image).
        image_token_id: the placeholder id.
        length: S, the spliced sequence length.
    """
    is_image = input_ids == image_token_id
    start = is_image.float().argmax(1)  # where the placeholder was: the first visual position
    positions = torch.arange(length, device=input_ids.device)
    count = visual_tokens.to(input_ids.device) * is_image.any(1)
    return (positions >= start[:, None]) & (positions < (start + count)[:, None])


def attention_pooled(weights: torch.Tensor, embeds: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """(E, S, C): at every query position, the visual embeddings averaged by its attention on them.

    Args:
        weights: (E, H, S, S) attention probabilities of one LLM layer.
        embeds: (E, S, C) the layer stack's input embeddings (visual tokens = projector outputs).
        visual: (E, S) bool, the visual positions.
    """
    on_visual = weights.detach().sum(1) * visual[:, None, :].to(weights.dtype)  # (E, S, S)
    return (on_visual / on_visual.sum(-1, keepdim=True).clamp(min=1e-9)) @ embeds


class ReadoutPretrainStage(PretrainStage):
    """Stage 1 (Eq. 1) plus ``readout_weight`` x the attention-pooled answer read-out loss.

    Stage keys: ``readout_weight`` (0 turns it off), ``readout_layer`` (the LLM layer whose attention
    pools; default -1, the last).
    """

    def __init__(self, core: AvgCore, stage: DictConfig):
        super().__init__(core, stage)
        self.weight = float(stage.get("readout_weight", 1.0))
        layer = int(stage.get("readout_layer", -1))
        self.final_only = stage.get("readout_tokens", "all") == "final"
        layers = core.llava.model.language_model.layers
        if self.weight < 0 or not -len(layers) <= layer < len(layers):
            raise ValueError(
                f"stage.readout_weight={self.weight} must be >= 0 and stage.readout_layer={layer} an index "
                f"into the LLM's {len(layers)} layers"
            )
        text = core.config.text_config
        self.readout_head = nn.Linear(text.hidden_size, text.vocab_size)
        self._weights: torch.Tensor | None = None
        layers[layer].self_attn.register_forward_hook(self._keep_weights)

    def _keep_weights(self, module, args, output) -> None:
        """Keeps the hooked layer's attention probabilities of the current forward."""
        if self.weight:
            self._weights = output[1]

    def readout_loss(self, batch: dict, out, split: str) -> torch.Tensor | None:
        """Token-mean CE of the head on the attention-pooled visual embeddings (None: nothing to score)."""
        weights, self._weights = self._weights, None
        spliced = out.spliced
        if weights is None:
            raise ValueError(
                "the answer read-out needs the LLM's attention weights: run it with "
                "model.attn_implementation=eager"
            )
        if spliced.segments is not None or spliced.labels is None:
            return None
        visual = visual_spans(
            batch["input_ids"], out.visual_tokens, self.core.image_token_id, spliced.embeds.shape[1]
        )
        targets = spliced.labels[:, 1:]  # the token each position predicts
        scored = (targets != -100) & visual.any(1, keepdim=True)
        if self.final_only:  # each answer's last token before its end-of-turn token: a short answer's word
            ends = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -100)], 1)
            scored &= ends == self.core.config.text_config.eos_token_id
        if not bool(scored.any()):
            return None
        size = self.batch_size(batch)
        self.log(f"{split}/readout_tokens_per_sample", scored.sum() / size, batch_size=size)
        pooled = attention_pooled(weights, spliced.embeds, visual)[:, :-1]
        return F.cross_entropy(self.readout_head(pooled[scored]), targets[scored])

    def step_loss(self, batch: dict, split: str) -> torch.Tensor:
        """Answer CE at the stage's level plus the weighted read-out loss, both logged."""
        out = self.answer_output(batch, split)
        loss = out.loss
        readout = self.readout_loss(batch, out, split) if self.weight else None
        if readout is not None:
            self.log(f"{split}/readout_loss", readout, batch_size=self.batch_size(batch))
            loss = loss + self.weight * readout
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The step loss; the head gets an exact zero when nothing was scored (DDP)."""
        return self.keep_in_graph(self.heads_in_graph(self.step_loss(batch, "train")), batch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """The step loss, logged."""
        self.step_loss(batch, "val")

    def stage_heads(self) -> dict[str, nn.Module]:
        """The read-out head, while the objective is on."""
        return {"readout_head": self.readout_head} if self.weight else {}
