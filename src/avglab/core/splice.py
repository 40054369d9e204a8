"""LLM inputs with the visual tokens in: each `<image>` placeholder replaced, then padded or packed.

One batch can mix samples fed at different granularities, so the spliced sequences differ in length
per sample; ``pad_spliced`` pads them (right for training, left for batched generation) and
``pack_spliced`` lets several share a row for scoring (:mod:`avglab.core.seqpack`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from avglab.core.seqpack import pack_rows


@dataclass
class Spliced:
    """LLM inputs after the visual tokens replaced the placeholders.

    Attributes:
        embeds: (B, S, C) input embeddings.
        attention_mask: (B, S).
        position_ids: (B, S) positions counted over real tokens only (left padding safe).
        labels: (B, S) or None; -100 on visual tokens and padding.
        segments: None when each row is one sequence; for packed rows (``pack_spliced``), (R, S)
            index of the sequence at each position (-1 on padding).
        right_padded: every row's padding comes after its real tokens.
    """

    embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    segments: torch.Tensor | None = None
    right_padded: bool = False

    @property
    def num_sequences(self) -> int:
        """Sequences held (rows, or packed sequences)."""
        return len(self.embeds) if self.segments is None else int(self.segments.max()) + 1


def insert_visual(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: list[torch.Tensor | None],
    labels: torch.Tensor | None,
    image_token_id: int,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per entry, the unpadded (n_e, C) embeddings and (n_e,) labels with the visual tokens in.

    Args:
        embeds: (E, L, C) input embeddings of ``input_ids``.
        input_ids: (E, L) ids with at most one ``image_token_id`` per row.
        attention_mask: (E, L).
        visual: E entries of (n_e, C) visual tokens, or None for a sample without an image.
        labels: (E, L) or None (then every label is -100).
        image_token_id: the ``<image>`` placeholder id.
    """
    seqs, labs = [], []
    for e, tokens in enumerate(visual):
        keep = attention_mask[e].bool()
        ids, emb = input_ids[e][keep], embeds[e][keep]
        lab = labels[e][keep] if labels is not None else torch.full_like(ids, -100)
        where = (ids == image_token_id).nonzero().flatten()
        if tokens is None:
            if len(where):
                raise ValueError(f"sample {e} has an <image> placeholder but no image; fix the data record")
        else:
            if len(where) != 1:
                raise ValueError(
                    f"sample {e} has {len(where)} <image> placeholders; avglab's core takes exactly one "
                    "per image sample"
                )
            p = int(where[0])
            emb = torch.cat([emb[:p], tokens.to(emb.dtype), emb[p + 1 :]])
            lab = torch.cat([lab[:p], lab.new_full((len(tokens),), -100), lab[p + 1 :]])
        seqs.append(emb)
        labs.append(lab)
    return seqs, labs


def pad_spliced(seqs: list[torch.Tensor], labs: list[torch.Tensor] | None, padding_side: str) -> Spliced:
    """One sequence per row, padded on ``padding_side``; positions count real tokens only."""
    embeds = pad_sequence(seqs, batch_first=True, padding_side=padding_side)
    mask = pad_sequence(
        [torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True, padding_side=padding_side
    ).to(embeds.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = (
        pad_sequence(labs, batch_first=True, padding_value=-100, padding_side=padding_side)
        if labs is not None
        else None
    )
    return Spliced(embeds, mask, positions, labels, right_padded=padding_side == "right")


def pack_spliced(seqs: list[torch.Tensor], labs: list[torch.Tensor]) -> Spliced:
    """Several sequences per row (``seqpack.pack_rows``), each with its own positions and causal attention."""
    embeds, positions, labels, segments = pack_rows(seqs, labs)
    return Spliced(embeds, torch.ones_like(positions), positions, labels, segments)
