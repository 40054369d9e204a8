"""Several LLM input sequences per row: the N granularity variants of a batch in fewer, fuller rows.

Stage 3 (Eq. 3) and the RGLF feedback (Eq. 4) feed every sample at all N levels in one LLM pass.
Padded one variant per row, each row is as long as the longest finest-level variant, and most of a
coarse variant's row is padding (measured on the tiny default: about 2/3 of the positions).
Packed, variants share rows and each keeps its own causal attention: position ids restart at every
sequence, which transformers' mask builder (``masking_utils.find_packed_sequence_indices``) turns
into a block-diagonal causal mask, so a token never attends across a sequence boundary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups sequences into rows of at most ``capacity`` tokens, longest first (first-fit decreasing).

    Args:
        lengths: token count of each sequence.
        capacity: tokens per row; at least the longest sequence.

    Returns:
        Rows of sequence indices; every index appears exactly once.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a sequence of {max(lengths)} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([])
            room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    return rows


def pack_rows(
    embeds: list[torch.Tensor], labels: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates sequences into shared rows as long as the longest one.

    Args:
        embeds: E sequences of (n_e, C) input embeddings.
        labels: E sequences of (n_e,) labels (-100 = not supervised).

    Returns:
        embeds (R, S, C) zero-padded; position_ids (R, S) restarting at 0 for every sequence (0 on
        padding, which makes each padding position a sequence of its own); labels (R, S), -100 on
        padding and on the first position of every sequence (never a target, as unpacked: nothing
        before it predicts it); segments (R, S) index of the sequence at each position, -1 on padding.
    """
    lengths = [len(e) for e in embeds]
    rows = first_fit_rows(lengths, max(lengths))
    device = embeds[0].device
    row_embeds, row_positions, row_labels, row_segments = [], [], [], []
    for members in rows:
        row_embeds.append(torch.cat([embeds[e] for e in members]))
        row_positions.append(torch.cat([torch.arange(lengths[e], device=device) for e in members]))
        row_labels.append(torch.cat([F.pad(labels[e][1:], (1, 0), value=-100) for e in members]))
        row_segments.append(torch.cat([torch.full((lengths[e],), e, device=device) for e in members]))
    return (
        pad_sequence(row_embeds, batch_first=True),
        pad_sequence(row_positions, batch_first=True),
        pad_sequence(row_labels, batch_first=True, padding_value=-100),
        pad_sequence(row_segments, batch_first=True, padding_value=-1),
    )
