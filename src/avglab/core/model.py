"""The shared model core: Hugging Face LLaVA-NeXT parts plus the granularity scaler and a selector.

One vision pass per sample per step (pitfall 6): ``encode`` runs the vision tower and projector
once, the scaler pools the projected grids to every level, the selector picks a level per sample,
and ``splice`` replaces each sample's single ``<image>`` placeholder by its packed visual tokens
(:mod:`avglab.core.splice`), so one batch can mix samples fed at different granularities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import LlavaNextForConditionalGeneration

from avglab.core.core_output import CoreOutput, Encoded, batch_rows
from avglab.core.packing import pack_image
from avglab.core.scaler import GranularityScaler
from avglab.core.selector import RouterInput
from avglab.core.splice import Spliced, insert_visual, pack_spliced, pad_spliced
from avglab.data.anyres import count_visual_tokens, num_tiles


class AvgCore(nn.Module):
    """LLaVA-NeXT with a granularity scaler and a selector over its levels.

    Args:
        llava: a ``LlavaNextForConditionalGeneration`` (random tiny or pretrained).
        granularities: tokens per tile of each level, coarse to fine.
        selector: maps a ``RouterInput`` to (B, N) logits (router, fixed, random) or None to
            always use the finest level (plain LLaVA-NeXT).
    """

    def __init__(
        self,
        llava: LlavaNextForConditionalGeneration,
        granularities: list[int],
        selector: nn.Module | None = None,
    ):
        super().__init__()
        self.llava = llava
        vision = llava.config.vision_config
        self.tile_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size
        self.scaler = GranularityScaler(self.grid, granularities)
        self.selector = selector
        # a training-free reduction (avglab.reduce, ``reduce=...``) or None; asked by duck typing
        self.reduction = None
        self.vision_cues = None  # what the last ``project`` left a reduction before the LLM (PruMerge+)

    # ----------------------------------------------------------------- geometry
    @property
    def config(self):
        """The LLaVA-NeXT config."""
        return self.llava.config

    @property
    def image_token_id(self) -> int:
        """Id of the single ``<image>`` placeholder per sample."""
        return self.config.image_token_id

    def token_counts(self, image_sizes: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """(B, N) visual tokens each level would feed the LLM (0 without image); needs no forward."""
        rows = []
        for size, present in zip(image_sizes.tolist(), has_image.tolist(), strict=True):
            rows.append(
                [
                    count_visual_tokens(size, self.config.image_grid_pinpoints, self.tile_size, self.grid, k)
                    if present
                    else 0
                    for k in self.scaler.kernels
                ]
            )
        return torch.tensor(rows, dtype=torch.long)

    # ----------------------------------------------------------------- vision
    def project(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, has_image: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Vision tower + projector, once per tile.

        Args:
            pixel_values: (B, T_max, 3, S, S) zero-padded tiles (HF processor format).
            image_sizes: (B, 2) original (height, width).
            has_image: (B,) bool.

        Returns:
            (T_total, C, grid, grid) projected tiles (None if no sample has an image) and the
            (T_total,) sample index of each tile.
        """
        counts = [
            num_tiles(size, self.config.image_grid_pinpoints, self.tile_size) if present else 0
            for size, present in zip(image_sizes.tolist(), has_image.tolist(), strict=True)
        ]
        device = self.llava.device
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(device)
        if not any(counts):
            return None, owner
        vision = self.llava.model.vision_tower
        pixels = torch.cat([pixel_values[i, :n] for i, n in enumerate(counts) if n]).to(device, vision.dtype)
        out = vision(pixels, output_hidden_states=True, return_dict=True)
        layer = self.config.vision_feature_layer
        feats = (
            out.hidden_states[layer]
            if isinstance(layer, int)
            else torch.cat([out.hidden_states[i] for i in layer], dim=-1)
        )
        reduction = self.reduction
        needs_cues = reduction is not None and reduction.needs_vision_cues
        self.vision_cues = reduction.vision_cues(out.hidden_states, vision, layer) if needs_cues else None
        if self.config.vision_feature_select_strategy == "default":
            feats = feats[:, 1:]  # drop CLS
        proj = self.llava.model.multi_modal_projector(feats)  # (T, grid*grid, C)
        return proj.transpose(1, 2).reshape(proj.shape[0], proj.shape[2], self.grid, self.grid), owner

    def encode(
        self, pixel_values: torch.Tensor, image_sizes: torch.Tensor, has_image: torch.Tensor
    ) -> Encoded:
        """``project`` then the scaler: every granularity of every tile (shapes as in ``project``)."""
        tiles, owner = self.project(pixel_values, image_sizes, has_image)
        return self.pyramid(tiles, owner, has_image)

    def pyramid(self, tiles: torch.Tensor | None, owner: torch.Tensor, has_image: torch.Tensor) -> Encoded:
        """Pools projected tiles (T, C, grid, grid) to all levels."""
        levels = self.scaler(tiles) if tiles is not None else []
        return Encoded(levels, owner, has_image.to(owner.device))

    def pack(
        self, encoded: Encoded, image_sizes: torch.Tensor, levels: torch.Tensor
    ) -> list[torch.Tensor | None]:
        """Visual token sequence per entry: entry i packs sample ``owner_map[i]`` at ``levels[i]``.

        Args:
            encoded: output of ``encode`` for B samples.
            image_sizes: (B, 2).
            levels: (E,) level per entry; E is B, or B*N for ``expand_levels`` (sample-major).

        Returns:
            E tensors of shape (n_tokens, C), None for samples without an image.
        """
        batch = len(image_sizes)
        repeat = len(levels) // batch
        owner = encoded.tile_owner.tolist()
        starts = {}
        for t, b in enumerate(owner):
            starts.setdefault(b, t)
        newline = self.llava.model.image_newline
        out: list[torch.Tensor | None] = []
        for entry, level in enumerate(levels.tolist()):
            b = entry // repeat
            if not bool(encoded.has_image[b]):
                out.append(None)
                continue
            start = starts[b]
            stop = start + owner.count(b)
            if self.vision_cues is not None:  # a reduction before the LLM packs the kept tokens
                if len(self.vision_cues[0]) != len(owner):
                    raise ValueError("the vision cues are of another batch: call project on these samples")
                cues = tuple(c[start:stop] for c in self.vision_cues)
                size = image_sizes[b].tolist()
                tiles = encoded.levels[level][start:stop]
                out.append(self.reduction.pack_image(self, tiles, cues, size, level))
                continue
            out.append(
                pack_image(
                    encoded.levels[level][start:stop],
                    image_sizes[b].tolist(),
                    self.config.image_grid_pinpoints,
                    self.tile_size,
                    self.grid,
                    self.scaler.kernels[level],
                    newline,
                )
            )
        return out

    # ----------------------------------------------------------------- selection
    def router_input(
        self, encoded: Encoded, input_ids: torch.Tensor, instruction_mask: torch.Tensor
    ) -> RouterInput:
        """Gathers the user's instruction embeddings (pitfall 3) next to the pooled tiles."""
        embeds = self.llava.get_input_embeddings()(input_ids)  # (B, L, C)
        mask = instruction_mask.bool()
        per_sample = [embeds[i][mask[i]] for i in range(len(input_ids))]
        instruction = pad_sequence(per_sample, batch_first=True)  # (B, Q, C)
        valid = pad_sequence([torch.ones(len(x), dtype=torch.bool) for x in per_sample], batch_first=True)
        return RouterInput(
            encoded.levels, encoded.tile_owner, instruction, valid.to(embeds.device), len(input_ids)
        )

    def select(self, encoded: Encoded, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Level per sample (B,) and router logits (B, N) (None without a selector: finest level)."""
        batch_size = len(batch["input_ids"])
        finest = torch.full((batch_size,), self.scaler.num_levels - 1, dtype=torch.long)
        if self.selector is None or not encoded.levels:
            return finest, None
        logits = self.selector(self.router_input(encoded, batch["input_ids"], batch["instruction_mask"]))
        return logits.argmax(-1).cpu(), logits

    # ----------------------------------------------------------------- language
    def splice(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: list[torch.Tensor | None],
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> Spliced:
        """Replaces each sample's ``<image>`` placeholder by its visual tokens and re-pads.

        Args:
            input_ids: (E, L) right-padded ids with at most one image token per row.
            attention_mask: (E, L).
            visual: E entries of (n_e, C) or None.
            labels: (E, L) or None.
            padding_side: "right" for training, "left" for batched generation.
        """
        seqs, labs = self.spliced_sequences(input_ids, attention_mask, visual, labels)
        spliced = pad_spliced(seqs, labs if labels is not None else None, padding_side)
        if self.reduction is not None and self.reduction.in_llm:  # it needs to know the visual positions
            ids = (input_ids, attention_mask, visual, self.image_token_id, padding_side)
            return self.reduction.mark(spliced, *ids)
        return spliced

    def splice_packed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: list[torch.Tensor | None],
        labels: torch.Tensor,
    ) -> Spliced:
        """``splice`` for scoring: the E sequences share rows as long as the longest (``seqpack``).

        Each sequence keeps its own causal attention and positions, so its answer scores are the
        padded ones; the rows hold about a third of the padded positions at N=5 levels.

        Returns:
            A ``Spliced`` of R <= E rows with ``segments`` set and ``attention_mask`` all ones.
        """
        if self.reduction is not None and self.reduction.in_llm:  # it prunes per row: padded rows
            return self.splice(input_ids, attention_mask, visual, labels)
        return pack_spliced(*self.spliced_sequences(input_ids, attention_mask, visual, labels))

    def spliced_sequences(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        visual: list[torch.Tensor | None],
        labels: torch.Tensor | None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per entry, the unpadded (n_e, C) input embeddings and (n_e,) labels with visual tokens in."""
        embeds = self.llava.get_input_embeddings()(input_ids)  # (E, L, C)
        return insert_visual(embeds, input_ids, attention_mask, visual, labels, self.image_token_id)

    def hidden_states(self, spliced: Spliced) -> torch.Tensor:
        """(E, S, C) last hidden states of the LLM."""
        if self.reduction is not None and self.reduction.in_llm:
            return self.reduction.hidden_states(self, spliced)
        mask, positions = spliced.attention_mask, spliced.position_ids
        if spliced.segments is not None:  # packed: transformers reads the boundaries from position_ids
            mask = None
        elif spliced.right_padded:
            # Padding after every real token: causal attention alone never lets a real token see it,
            # so no mask (and positions 0..S-1, the real ones on real tokens) lets SDPA run its causal
            # kernel, which skips the masked half (measured 2-4% off a tiny stage-1 step on CPU).
            mask = positions = None
        out = self.llava.model.language_model(
            inputs_embeds=spliced.embeds, attention_mask=mask, position_ids=positions, use_cache=False
        )
        return out.last_hidden_state

    def answer_scores(
        self, hidden: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token answer log-probs (Eq. 4's terms) computed only at supervised positions.

        The LM head runs only where a label follows, which saves the (E, S, V) logits tensor.

        Args:
            hidden: (R, S, C) last hidden states.
            labels: (R, S).
            segments: (R, S) sequence index per position for packed rows, None for one per row.

        Returns:
            token_logprob: (n_answer_tokens,) log P(x_t | ...), and owner (n_answer_tokens,) sequence index.
        """
        targets = labels[:, 1:]
        where = targets != -100  # (R, S-1)
        picked = hidden[:, :-1][where]  # (n, C)
        logits = self.llava.lm_head(picked).float()
        token_logprob = -F.cross_entropy(logits, targets[where], reduction="none")
        owner = where.nonzero()[:, 0] if segments is None else segments[:, 1:][where]
        return token_logprob, owner

    def score(
        self, spliced: Spliced, hidden: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Answer statistics of spliced inputs (labels required).

        Args:
            spliced: LLM inputs with labels.
            hidden: their last hidden states if already computed.

        Returns:
            mean_logprob (E,) (NaN without answer tokens), n_tokens (E,), and the token-mean CE loss
            (an exact 0 that still carries the graph when the batch has no answer token).
        """
        hidden = self.hidden_states(spliced) if hidden is None else hidden
        token_logprob, owner = self.answer_scores(hidden, spliced.labels, spliced.segments)
        entries = spliced.num_sequences
        count = torch.bincount(owner, minlength=entries)
        total = token_logprob.new_zeros(entries).index_add(0, owner, token_logprob)
        mean = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
        loss = -token_logprob.mean() if len(token_logprob) else hidden.sum() * 0.0
        return mean, count, loss

    # ----------------------------------------------------------------- entry points
    def forward(self, batch: dict, level: int | None = None, return_logits: bool = False) -> CoreOutput:
        """Routed forward: one vision pass, a level per sample, one LLM pass on the mixed batch.

        Args:
            batch: the collate contract (input_ids, attention_mask, labels, instruction_mask,
                pixel_values, image_sizes, has_image).
            level: force this level index for every sample; the selector is then not run (None: ask it).
            return_logits: also return the full (B, S, V) logits.
        """
        encoded = self.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        if level is None:
            levels, router_logits = self.select(encoded, batch)
        else:  # a forced level never asks the selector (its forward would cost ~9% of a stage-1 step)
            levels = torch.full((len(batch["input_ids"]),), level % self.scaler.num_levels, dtype=torch.long)
            router_logits = None
        visual = self.pack(encoded, batch["image_sizes"], levels)
        spliced = self.splice(batch["input_ids"], batch["attention_mask"], visual, batch.get("labels"))
        has_image = batch["has_image"].cpu()
        tokens = torch.tensor([0 if v is None else len(v) for v in visual])
        levels = torch.where(has_image, levels, torch.full_like(levels, -1))
        hidden = self.hidden_states(spliced)
        logits = self.llava.lm_head(hidden) if return_logits else None
        if spliced.labels is not None:
            mean, count, loss = self.score(spliced, hidden)
        else:
            mean = torch.full((len(levels),), float("nan"))
            count = torch.zeros(len(levels), dtype=torch.long)
            loss = hidden.sum() * 0.0
        return CoreOutput(levels, tokens, router_logits, mean, count, loss, logits, spliced)

    def all_levels(
        self, batch: dict, encoded: Encoded | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every sample at every granularity in ONE batched LLM pass (Eq. 3 and Eq. 4).

        Returns:
            mean_logprob (B, N) answer score r_i per level (NaN without answer tokens),
            n_tokens (B,) answer tokens per sample, and the token-mean CE over all B*N variants,
            which equals the mean over levels of each level's CE (Eq. 3) because every level
            supervises the same answer tokens.
        """
        if encoded is None:
            encoded = self.encode(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
        n = self.scaler.num_levels
        batch_size = len(batch["input_ids"])
        levels = torch.arange(n).repeat(batch_size)  # sample-major: entry b*N + l
        visual = self.pack(encoded, batch["image_sizes"], levels)
        spliced = self.splice_packed(  # coarse variants fill the rows' padding (seqpack)
            batch["input_ids"].repeat_interleave(n, 0),
            batch["attention_mask"].repeat_interleave(n, 0),
            visual,
            batch["labels"].repeat_interleave(n, 0),
        )
        mean, count, loss = self.score(spliced)
        return mean.view(batch_size, n), count.view(batch_size, n)[:, 0], loss

    def level_feedback(self, batch: dict, encoded: Encoded) -> torch.Tensor:
        """RGLF's feedback r (Eq. 4) of the samples with an image, scored in one ``all_levels`` pass.

        A text-only sample sees the same sequence at every level, so its N scores tie and carry no
        preference (pitfall 7). It is not scored at all (its N identical LLM passes would be wasted,
        and rounding in packed rows could even break the tie): its row is NaN, "no feedback", which
        ``rglf_loss`` leaves out of both terms like a sample without answer tokens.

        Args:
            batch: the collate contract (labels required).
            encoded: ``encode`` of the whole batch.

        Returns:
            (B, N) mean answer log-probabilities, NaN rows for text-only samples (and for samples
            without answer tokens).
        """
        has_image = encoded.has_image.cpu()
        shape = (len(has_image), self.scaler.num_levels)
        feedback = torch.full(shape, float("nan"), device=self.llava.device)
        if has_image.any():
            rows = has_image.nonzero()[:, 0]
            scores, _, _ = self.all_levels(batch_rows(batch, rows), encoded.rows(rows))
            feedback[rows.to(feedback.device)] = scores.to(feedback.dtype)
        return feedback
