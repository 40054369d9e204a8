"""FocusLLaVA on the shared model core (METHOD 2): ``FocusCore(AvgCore)``.

Same vision pass, projector, splice, answer scoring and weights handoff as AVG-LLaVA; what
differs is where visual tokens are cut:
- the vision-guided sampler (``VisionSampler``, stored as the core's ``selector`` so the stage
  part ``router`` trains it and ``core.safetensors`` hands it over) replaces AVG's pooling+router;
- the text-guided sampler prunes inside the LLM (``PrunedLanguageModel``), in training and in
  greedy decoding with a KV cache (``generate_greedy``, which the evaluation stage calls).

Level convention for the evaluation stage: ``select`` returns ``FOCUS_LEVEL`` (-1) for every
sample, meaning "the FocusLLaVA samplers decide"; a fixed level 0..N-1 (the ``fixed@g`` rows)
packs AVG's pooled grid instead, with the same weights and the text sampler still on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import LlavaNextForConditionalGeneration
from transformers.cache_utils import DynamicCache

from avglab.core.core_output import CoreOutput, Encoded
from avglab.core.generation import Generated, greedy_generate, synchronize
from avglab.core.model import AvgCore
from avglab.core.packing import pack_image
from avglab.core.splice import Spliced
from avglab.focus.pruned_llm import PrunedLanguageModel, PrunedState, equivalent_tokens
from avglab.focus.text_sampler import TextPlan, TextSampler
from avglab.focus.vision_sampler import VisionSample, VisionSampler, balance_loss

FOCUS_LEVEL = -1


@dataclass
class FocusEncoded(Encoded):
    """``Encoded`` plus the full-resolution projected tiles the vision sampler reads.

    Attributes:
        tiles: (T_total, C, g, g) or None without images.
    """

    tiles: torch.Tensor | None = None


@dataclass
class FocusSpliced(Spliced):
    """``Spliced`` plus where each position came from.

    Attributes:
        visual_mask: (E, S) bool, visual tokens.
        source_index: (E, S) long, index of each text position in the input ids row; -1 on visual
            tokens and padding (maps any per-token mask, e.g. the instruction mask, onto the sequence).
    """

    visual_mask: torch.Tensor | None = None
    source_index: torch.Tensor | None = None

    def map_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(E, L) per-input-token bool mask -> (E, S) on the spliced sequence."""
        src = self.source_index.to(mask.device)
        return mask.bool().gather(1, src.clamp(min=0)) & (src >= 0)


@dataclass
class FocusOutput(CoreOutput):
    """``CoreOutput`` plus FocusLLaVA's statistics.

    Attributes:
        balance_loss: alpha-weighted balance loss of the vision selector (0 without it).
        vision: the vision sampler's regions, logits and choices, or None.
        removed: (B,) visual tokens removed inside the LLM (n).
        text_layer: (B,) selection layer that pruned each sample (0 = none).
        equivalent_tokens: (B,) ``m - n + i * n / L``.
    """

    balance_loss: torch.Tensor
    vision: VisionSample | None
    removed: torch.Tensor
    text_layer: torch.Tensor
    equivalent_tokens: torch.Tensor


@dataclass
class FocusGenerated(Generated):
    """``Generated`` plus in-LLM pruning counts of the prompt.

    Attributes:
        removed: (B,) visual tokens removed inside the LLM.
        equivalent_tokens: (B,) ``m - n + i * n / L``.
        logits: (B, T, V) logits of every generated step (only with ``keep_logits``).
    """

    removed: torch.Tensor | None = None
    equivalent_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class FocusCore(AvgCore):
    """LLaVA-NeXT with FocusLLaVA's vision- and/or text-guided samplers.

    Args:
        llava: a ``LlavaNextForConditionalGeneration``.
        granularities: AVG levels kept for the ``fixed@g`` comparison rows and full token counts.
        vision: the vision-guided sampler, or None (every local token is kept, as LLaVA-NeXT).
        text: the text-guided sampler settings, or None (no pruning inside the LLM).
        balance_alpha: weight alpha of the balance loss (paper: 0.1).
        balance_weights: imbalance weights w_i (sum = number of branches), or None.
    """

    def __init__(
        self,
        llava: LlavaNextForConditionalGeneration,
        granularities: list[int],
        vision: VisionSampler | None = None,
        text: TextSampler | None = None,
        balance_alpha: float = 0.1,
        balance_weights: list[float] | None = None,
    ):
        super().__init__(llava, granularities, selector=vision)
        self.text = text
        self.balance_alpha = balance_alpha
        self.balance_weights = balance_weights

    @property
    def vision(self) -> VisionSampler | None:
        """The vision-guided sampler (the core's selector)."""
        return self.selector

    @property
    def depth(self) -> int:
        """L, decoder layers of the LLM."""
        return len(self.llava.model.language_model.layers)

    # ----------------------------------------------------------------- vision
    def pyramid(
        self, tiles: torch.Tensor | None, owner: torch.Tensor, has_image: torch.Tensor
    ) -> FocusEncoded:
        """AVG's pooled levels (for ``fixed@g``) plus the full tiles (for the vision sampler)."""
        encoded = super().pyramid(tiles, owner, has_image)
        return FocusEncoded(encoded.levels, encoded.tile_owner, encoded.has_image, tiles)

    def select(self, encoded: Encoded, batch: dict) -> tuple[torch.Tensor, None]:
        """``FOCUS_LEVEL`` for every sample: the samplers decide (no router logits)."""
        return torch.full((len(batch["input_ids"]),), FOCUS_LEVEL, dtype=torch.long), None

    def sample_visual(
        self,
        tiles: torch.Tensor | None,
        owner: torch.Tensor,
        image_sizes: torch.Tensor,
        has_image: torch.Tensor,
    ) -> tuple[list[torch.Tensor | None], VisionSample | None]:
        """Visual tokens per sample: the vision sampler's, or LLaVA-NeXT's full packing without it."""
        if tiles is None:
            return [None] * len(image_sizes), None
        pinpoints, newline = self.config.image_grid_pinpoints, self.llava.model.image_newline
        if self.vision is not None:
            sample = self.vision(tiles, owner, image_sizes, has_image, pinpoints, self.tile_size, newline)
            return sample.visual, sample
        owners = owner.tolist()
        visual: list[torch.Tensor | None] = []
        for b, size in enumerate(image_sizes.tolist()):
            if not bool(has_image[b]):
                visual.append(None)
                continue
            mine = tiles[[t for t, o in enumerate(owners) if o == b]]
            visual.append(pack_image(mine, size, pinpoints, self.tile_size, self.grid, (1, 1), newline))
        return visual, None

    def pack(
        self, encoded: Encoded, image_sizes: torch.Tensor, levels: torch.Tensor
    ) -> list[torch.Tensor | None]:
        """``FOCUS_LEVEL`` entries get the samplers' tokens; fixed levels get AVG's pooled packing."""
        fixed = super().pack(encoded, image_sizes, levels.clamp(min=0)) if bool((levels >= 0).any()) else None
        if bool((levels >= 0).all()):
            return fixed
        if len(levels) != len(image_sizes):
            raise ValueError("FocusCore.pack: FOCUS_LEVEL entries need one level per sample")
        focus, _ = self.sample_visual(encoded.tiles, encoded.tile_owner, image_sizes, encoded.has_image)
        return [f if lv < 0 else x for lv, f, x in zip(levels.tolist(), focus, fixed or focus, strict=True)]

    # ----------------------------------------------------------------- language
    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: list[torch.Tensor | None],
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> FocusSpliced:
        """``AvgCore.splice`` plus the visual mask and source index of every position."""
        base = super().splice(input_ids, attention_mask, visual, labels, padding_side)
        sources, flags = [], []
        for e, tokens in enumerate(visual):
            keep = attention_mask[e].bool()
            src = torch.arange(input_ids.shape[1], device=input_ids.device)[keep]
            flag = torch.zeros(len(src), dtype=torch.bool, device=input_ids.device)
            if tokens is not None:
                p = int((input_ids[e][keep] == self.image_token_id).nonzero()[0])
                src = torch.cat([src[:p], src.new_full((len(tokens),), -1), src[p + 1 :]])
                flag = torch.cat([flag[:p], flag.new_ones(len(tokens)), flag[p + 1 :]])
            sources.append(src)
            flags.append(flag)
        device = base.embeds.device
        source = pad_sequence(sources, batch_first=True, padding_value=-1, padding_side=padding_side)
        visual_mask = pad_sequence(flags, batch_first=True, padding_side=padding_side)
        return FocusSpliced(
            base.embeds,
            base.attention_mask,
            base.position_ids,
            base.labels,
            visual_mask=visual_mask.to(device),
            source_index=source.to(device),
        )

    @property
    def pruned_lm(self) -> PrunedLanguageModel:
        """The text sampler's forward over this instance's decoder (no class is patched)."""
        return PrunedLanguageModel(self.llava.model.language_model)

    def prune_forward(
        self,
        spliced: FocusSpliced,
        instruction_mask: torch.Tensor,
        plan: TextPlan | None = None,
        cache: DynamicCache | None = None,
        padding_side: str = "right",
    ) -> PrunedState:
        """The LLM with the text sampler (Eqs. 8-9) on spliced inputs.

        Args:
            spliced: from ``splice``.
            instruction_mask: (E, L) user instruction tokens of the unspliced ids: the text queries.
            plan: per-sample layer and gamma (default: the sampler's plan for the current mode).
            cache: a ``DynamicCache`` to fill for decoding, or None.
            padding_side: padding side of ``spliced``.
        """
        batch = len(spliced.embeds)
        plan = plan or self.text.plan(batch, spliced.embeds.device)
        return self.pruned_lm.forward(
            spliced.embeds,
            spliced.attention_mask,
            spliced.position_ids,
            spliced.visual_mask,
            spliced.map_mask(instruction_mask),
            plan,
            labels=spliced.labels,
            cache=cache,
            padding_side=padding_side,
        )

    # ----------------------------------------------------------------- entry points
    def forward(self, batch: dict, level: int | None = None, return_logits: bool = False) -> FocusOutput:
        """One vision pass, the vision sampler, one (pruned) LLM pass; shapes as in ``AvgCore.forward``.

        Args:
            batch: the collate contract.
            level: a fixed AVG level for every sample instead of the vision sampler (None: samplers).
            return_logits: also return (B, S', V) logits of the kept sequence.
        """
        tiles, owner = self.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        if level is None:
            visual, sample = self.sample_visual(tiles, owner, batch["image_sizes"], batch["has_image"])
        else:
            levels = torch.full((len(batch["input_ids"]),), level % self.scaler.num_levels)
            visual, sample = (
                self.pack(self.pyramid(tiles, owner, batch["has_image"]), batch["image_sizes"], levels),
                None,
            )
        spliced = self.splice(batch["input_ids"], batch["attention_mask"], visual, batch.get("labels"))
        size = len(visual)
        tokens = torch.tensor([0 if v is None else len(v) for v in visual])
        if self.text is not None:
            state = self.prune_forward(spliced, batch["instruction_mask"])
            hidden, labels = state.hidden, state.labels
            removed, layer = state.removed.cpu(), state.layer.cpu()
        else:
            hidden, labels = self.hidden_states(spliced), spliced.labels
            removed = layer = torch.zeros(size, dtype=torch.long)
        logits = self.llava.lm_head(hidden) if return_logits else None
        if labels is not None:
            kept = Spliced(hidden, torch.ones_like(labels), torch.zeros_like(labels), labels)
            mean, count, loss = self.score(kept, hidden)
        else:
            mean, count = torch.full((size,), float("nan")), torch.zeros(size, dtype=torch.long)
            loss = hidden.sum() * 0.0
        balance = hidden.sum() * 0.0
        if sample is not None:
            balance = balance + balance_loss(
                sample.probs, sample.choice, self.balance_alpha, self.balance_weights
            )
        has_image = batch["has_image"].cpu()
        levels = torch.where(has_image, torch.full((size,), FOCUS_LEVEL if level is None else level), -1)
        return FocusOutput(
            levels,
            tokens,
            None,
            mean,
            count,
            loss,
            logits,
            spliced,
            balance,
            sample,
            removed,
            layer,
            equivalent_tokens(tokens, removed, layer, self.depth),
        )

    @torch.no_grad()
    def generate_greedy(
        self, prompt: Spliced, batch: dict, max_new_tokens: int, eos_token_id: int, keep_logits: bool = False
    ) -> FocusGenerated:
        """Greedy decoding with the text sampler and a KV cache (the evaluation stage's hook).

        Args:
            prompt: left-padded spliced prompt from ``splice`` (a ``FocusSpliced``).
            batch: the collate batch (its ``instruction_mask`` gives the text queries).
            max_new_tokens: generation budget.
            eos_token_id: stops a sample.
            keep_logits: also return every step's logits (tests).
        """
        tokens = prompt.visual_mask.sum(1).cpu() if isinstance(prompt, FocusSpliced) else None
        if self.text is None or not isinstance(prompt, FocusSpliced):
            out = greedy_generate(self, prompt, max_new_tokens, eos_token_id)
            zero = torch.zeros(len(out.tokens), dtype=torch.long)
            visual = tokens if tokens is not None else zero
            return FocusGenerated(
                out.tokens, out.prefill_ms, out.decode_ms, out.decode_steps, zero, visual.float()
            )
        device = prompt.embeds.device
        instruction = batch["instruction_mask"][:, : batch["prompt_input_ids"].shape[1]]
        cache = DynamicCache(config=self.llava.model.language_model.config)
        start = time.perf_counter()
        state = self.prune_forward(prompt, instruction, cache=cache, padding_side="left")
        logits = self.llava.lm_head(state.hidden[:, -1])  # left padding: the last column is real
        token = logits.argmax(-1)
        synchronize(device)
        prefill = time.perf_counter() - start
        out, done, steps, kept = [token], token == eos_token_id, 0, [logits]
        position = prompt.position_ids[:, -1:]
        start = time.perf_counter()
        embed = self.llava.get_input_embeddings()
        while steps < max_new_tokens - 1 and not bool(done.all()):
            position = position + 1
            hidden = self.pruned_lm.decode(embed(token[:, None]), position, state, cache)
            logits = self.llava.lm_head(hidden[:, -1])
            token = torch.where(done, torch.full_like(token, eos_token_id), logits.argmax(-1))
            out.append(token)
            kept.append(logits)
            done = done | (token == eos_token_id)
            steps += 1
        synchronize(device)
        removed, layer = state.removed.cpu(), state.layer.cpu()
        return FocusGenerated(
            torch.stack(out, dim=1),
            prefill * 1e3,
            (time.perf_counter() - start) * 1e3,
            steps,
            removed,
            equivalent_tokens(tokens, removed, layer, self.depth),
            torch.stack(kept, dim=1) if keep_logits else None,
        )
