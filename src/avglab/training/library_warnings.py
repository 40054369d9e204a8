"""The one place where avglab silences warnings: library messages it cannot fix, matched exactly.

Every entry is a warning raised inside a library about the library's own code (not a call of
ours), with the reason it is safe to drop. Warnings caused by avglab's own calls are fixed at the
call instead (e.g. ``core.transformers_names``), never listed here.
"""

from __future__ import annotations

import re
import warnings

LIBRARY_WARNINGS: dict[str, str] = {
    # Lightning 2.6's own pytree helper (lightning/pytorch/utilities/_pytree.py) builds a LeafSpec,
    # which torch 2.10+ deprecates; nothing of avglab's is involved and the result is unchanged.
    "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and "
    "treespec.is_leaf()` instead.": "lightning-pytree",
    # Lightning cannot know that avglab's datamodule restores its own position in the shards
    # (data.resume: the data position is in the checkpoint), so a mid-epoch resume is exact.
    "You're resuming from a checkpoint that ended before the epoch ended": "lightning-mid-epoch-resume",
}


def silence_library_warnings() -> None:
    """Ignores :data:`LIBRARY_WARNINGS` (each by its exact message start) in this process."""
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(message))
