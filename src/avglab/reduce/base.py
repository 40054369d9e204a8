"""What every reduction offers the core, and the in-LLM kind's part of it (FastV, VTW).

The core (``AvgCore``) holds one reduction or None in ``core.reduction`` and asks it by duck typing:

- ``in_llm``: prunes inside the LLM. Then ``mark`` adds the visual mask to spliced inputs,
  ``hidden_states`` replaces the LLM forward and ``stepper`` the cached prefill/decode steps of
  ``greedy_generate``.
- ``needs_vision_cues``: reduces before the LLM from vision-encoder attention (PruMerge+). Then
  ``vision_cues`` reads the vision pass and ``pack_image`` replaces AnyRes packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from avglab.core.generation import Generated
from avglab.core.splice import Spliced
from avglab.reduce.llm_pruning import LayerPrunedLM


class ReduceConfigError(ValueError):
    """A ``reduce.*`` value that cannot run, named in the message."""


def resolve_layer(value: int | float, depth: int, key: str, lowest: int = 0) -> int:
    """K as an absolute layer count: ints are absolute, floats fractions of the depth (rounded).

    Raises:
        ReduceConfigError: an int outside [lowest, depth] or a fraction outside [0, 1].
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReduceConfigError(f"{key}={value!r}: give an int layer ({lowest}..{depth}) or a float fraction")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ReduceConfigError(f"{key}={value}: a fraction of the depth must be in [0, 1]")
        value = int(value * depth + 0.5)
    if not lowest <= value <= depth:
        raise ReduceConfigError(f"{key}={value}: must be in [{lowest}, {depth}] for this {depth}-layer LLM")
    return max(int(value), lowest)


@dataclass
class ReducedSpliced(Spliced):
    """``Spliced`` plus its visual tokens.

    Attributes:
        visual_mask: (E, S) bool, visual tokens.
    """

    visual_mask: torch.Tensor | None = None


@dataclass
class ReducedGenerated(Generated):
    """``Generated`` plus the visual tokens each LLM layer saw.

    Attributes:
        visual_tokens_per_layer: (B, L) long.
        equivalent_tokens: (B,) their mean over layers (``m - n + K n / L``).
    """

    visual_tokens_per_layer: torch.Tensor | None = None
    equivalent_tokens: torch.Tensor | None = None


def visual_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: list[torch.Tensor | None],
    image_token_id: int,
    padding_side: str,
) -> torch.Tensor:
    """(E, S) bool over the spliced rows: where each entry's visual tokens went (as ``insert_visual``)."""
    flags = []
    for e, tokens in enumerate(visual):
        ids = input_ids[e][attention_mask[e].bool()]
        flag = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        if tokens is not None:
            p = int((ids == image_token_id).nonzero()[0])
            flag = torch.cat([flag[:p], flag.new_ones(len(tokens)), flag[p + 1 :]])
        flags.append(flag)
    return pad_sequence(flags, batch_first=True, padding_side=padding_side)


class Reduction:
    """A training-free reduction. Subclasses set ``name`` and their settings; ``label`` names a row."""

    name = "none"
    in_llm = False
    needs_vision_cues = False

    @property
    def label(self) -> str:
        """Row name in tables (the method and its settings)."""
        return self.name

    def settings(self) -> dict:
        """The settings behind the label (metrics.json)."""
        return {"name": self.name}


class InLLMReduction(Reduction):
    """Drops visual tokens after LLM layer ``layer``; subclasses define ``choose``.

    Args:
        layer: K (absolute, already resolved against the depth).
    """

    in_llm = True

    def __init__(self, layer: int):
        self.layer = layer

    def choose(self, layer, hidden, position_embeddings, mask, visual) -> torch.Tensor:
        """(B, S) bool kept visual tokens, from layer K's module and input (see ``llm_pruning.Chooser``)."""
        raise NotImplementedError

    def pruned_lm(self, core) -> LayerPrunedLM:
        """``core``'s decoder, pruned after layer K by ``choose``."""
        lm = core.llava.model.language_model
        return LayerPrunedLM(lm, self.layer, self.choose, getattr(self, "scored_layer", None))

    def mark(self, spliced: Spliced, input_ids, attention_mask, visual, image_token_id, padding_side):
        """``spliced`` with its visual mask (``ReducedSpliced``)."""
        flags = visual_mask(input_ids, attention_mask, visual, image_token_id, padding_side)
        return ReducedSpliced(**vars(spliced), visual_mask=flags.to(spliced.embeds.device))

    def hidden_states(self, core, spliced: Spliced) -> torch.Tensor:
        """(E, S, C) last hidden states at the input positions (a dropped one: its state when it left)."""
        if spliced.segments is not None or getattr(spliced, "visual_mask", None) is None:
            raise ValueError("an in-LLM reduction needs padded rows spliced by a core that carries it")
        padding_side = "right" if bool(spliced.attention_mask[:, 0].all()) else "left"
        run = self.pruned_lm(core).forward(
            spliced.embeds,
            spliced.attention_mask,
            spliced.position_ids,
            spliced.visual_mask,
            None,
            padding_side,
        )
        return run.hidden if run.withdrawn is None else run.withdrawn

    def stepper(self, core, prompt: Spliced) -> PrunedSteps:
        """The prefill/decode steps for ``greedy_generate`` on a left-padded marked prompt."""
        return PrunedSteps(self.pruned_lm(core), prompt.visual_mask)


class PrunedSteps:
    """``language_model_step``'s stand-in: the first call prefills (pruning), later calls decode.

    Args:
        pruned: the wrapped decoder.
        visual: (B, S) visual mask of the prompt.
    """

    def __init__(self, pruned: LayerPrunedLM, visual: torch.Tensor):
        self.pruned, self.visual, self.run = pruned, visual, None

    def __call__(self, language_model, embeds, mask, positions, cache) -> torch.Tensor:
        """(B, C) last hidden state of the last position (``language_model_step``'s contract)."""
        if self.run is None:
            if mask is None:
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
            self.run = self.pruned.forward(embeds, mask, positions, self.visual, cache, "left")
            return self.run.hidden[:, -1]
        return self.pruned.decode(embeds, positions, self.run, cache)[:, -1]

    def generated(self, out: Generated) -> ReducedGenerated:
        """``out`` with the visual tokens per layer of the prefill."""
        per_layer = self.run.visual_per_layer.cpu()
        return ReducedGenerated(
            **vars(out), visual_tokens_per_layer=per_layer, equivalent_tokens=per_layer.float().mean(1)
        )
