"""Where a data config's shards are: split globs under ``data.root``, checked before anything runs."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

SPLITS = ("train", "val", "test")


def shard_urls(data: Mapping) -> dict[str, list[str]]:
    """Shard paths per split from ``data.root`` and ``data.<split>_shards`` (a glob; null = no split).

    Args:
        data: the ``data`` config (``root``, ``train_shards``, ``val_shards``, ``test_shards``).

    Returns:
        ``{split: sorted paths}`` for every split whose glob is set.

    Raises:
        FileNotFoundError: when a set glob matches no file, with the command that writes shards.
        ValueError: when no split is set.
    """
    root = str(data["root"])
    urls = {}
    for split in SPLITS:
        pattern = data.get(f"{split}_shards")
        if not pattern:
            continue
        found = sorted(glob.glob(os.path.join(root, str(pattern))))  # an absolute pattern ignores root
        if not found:
            raise FileNotFoundError(
                f"data.{split}_shards={pattern!r} matches no file under data.root={root}. Convert the data "
                f"first: python -m avglab.data.convert <records.json> --images <image folder> --out {root} "
                f"--split {split} (set AVGLAB_DATA or data.root to where the shards are)"
            )
        urls[split] = found
    if not urls:
        raise ValueError("the data config names no shards: set data.train_shards, val_shards or test_shards")
    return urls
