"""Pads processed samples of different lengths and tile counts into the batch the model core reads."""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from avglab.data.processor import IGNORE_INDEX


def _pad(seqs: list[torch.Tensor], value: int | bool | float) -> torch.Tensor:
    """Right-pads along the first axis: list of (n_i, ...) -> (B, max n_i, ...)."""
    return pad_sequence(seqs, batch_first=True, padding_value=value, padding_side="right")


def _ones(seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.ones(len(s), dtype=torch.long) for s in seqs]


def collate(samples: list[dict], pad_token_id: int) -> dict:
    """Batches samples from :class:`~avglab.data.processor.SampleProcessor`.

    Args:
        samples: processed samples (any mix of tile counts, lengths and text-only samples).
        pad_token_id: id written into padded token positions.

    Returns:
        input_ids (B, L) long, right-padded with ``pad_token_id``; attention_mask (B, L) long;
        labels (B, L) long, -100 except answer tokens and their end-of-turn token;
        instruction_mask (B, L) bool, True only on user instruction tokens;
        prompt_input_ids, prompt_attention_mask (B, P) long: the generation prompt, right-padded;
        pixel_values (B, T_max, 3, S, S) float, zero-padded along the tile axis;
        image_sizes (B, 2) long (height, width), (S, S) for text-only samples;
        has_image (B,) bool; ids list[str]; question_type list[str]; answers list[list[str]].

    Raises:
        ValueError: for an empty list.
    """
    if not samples:
        raise ValueError("collate got no samples; every sample of the batch was skipped upstream")
    input_ids = [s["input_ids"] for s in samples]
    prompts = [s["input_ids"][: s["prompt_len"]] for s in samples]
    return {
        "input_ids": _pad(input_ids, pad_token_id),
        "attention_mask": _pad(_ones(input_ids), 0),
        "labels": _pad([s["labels"] for s in samples], IGNORE_INDEX),
        "instruction_mask": _pad([s["instruction_mask"] for s in samples], False),
        "prompt_input_ids": _pad(prompts, pad_token_id),
        "prompt_attention_mask": _pad(_ones(prompts), 0),
        "pixel_values": _pad([s["pixel_values"] for s in samples], 0.0),  # (B, T_max, 3, S, S)
        "image_sizes": torch.stack([s["image_size"] for s in samples]).long(),
        "has_image": torch.tensor([bool(s["has_image"]) for s in samples], dtype=torch.bool),
        "ids": [s["id"] for s in samples],
        "question_type": [s["question_type"] for s in samples],
        "answers": [list(s["answers"]) for s in samples],
    }
