"""The process's random number generators as checkpoint data, and back.

Lightning checkpoints the weights, optimizer, schedulers and loops but not the generators that dropout,
Gumbel noise or random levels draw from; a resumed run would draw other numbers than the run it
continues. Stored as tensors, ints and tuples, so checkpoints still load with ``weights_only=True``.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The generator states of torch (CPU, every CUDA device), Python's ``random`` and NumPy."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
    }


def restore(state: dict) -> None:
    """Sets the generators to a :func:`capture` result (CUDA devices only when there are as many)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def _tuples(value):
    """Python's generator state with its tuples back (a checkpoint may hand lists)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
