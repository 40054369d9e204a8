"""Every rank's Python object in rank order (``all_gather_object``), or this process's alone.

Evaluation records and a training stream's data position are per rank (each rank reads its own shards);
whoever reports or checkpoints them needs all ranks' in one place.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def distributed() -> bool:
    """Whether a process group of 2 or more ranks is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, rank 0 first; ``[obj]`` outside a process group of 2+ ranks.

    A collective: every rank must call it at the same point (pickled objects, any backend).
    """
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
