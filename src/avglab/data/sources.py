"""Where a data config's shards are: split globs under ``data.root``, checked before anything runs."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Mapping

SPLITS = ("train", "val", "test")

log = logging.getLogger(__name__)


def shard_urls(data: Mapping) -> dict[str, list[str]]:
    """Shard paths per split from ``data.root`` and ``data.<split>_shards`` (a glob; null = no split).

    Args:
        data: the ``data`` config (``root``, ``train_shards``, ``val_shards``, ``test_shards``, and
            ``optional_splits``: splits whose glob may match nothing, which are then left out).

    Returns:
        ``{split: sorted paths}`` for every split whose glob is set.

    Raises:
        FileNotFoundError: when a glob of a required split matches no file, or no split has shards,
            with the command that writes shards.
        ValueError: when no split is set.
    """
    root = str(data["root"])
    optional = set(data.get("optional_splits") or ())
    urls = {}
    for split in SPLITS:
        pattern = data.get(f"{split}_shards")
        if not pattern:
            continue
        found = sorted(glob.glob(os.path.join(root, str(pattern))))  # an absolute pattern ignores root
        if not found and split in optional:
            log.info("data: no %s split (%s matches nothing under %s)", split, pattern, root)
            continue
        if not found:
            raise FileNotFoundError(
                f"data.{split}_shards={pattern!r} matches no file under data.root={root}. Convert the data "
                f"first: python -m avglab.data.convert <records.json> --images <image folder> --out {root} "
                f"--split {split} (set AVGLAB_DATA or data.root to where the shards are)"
            )
        urls[split] = found
    if not urls and optional:
        raise FileNotFoundError(
            f"data.root={root} holds no shards of any split ({', '.join(sorted(optional))}). Convert the "
            f"data first: python -m avglab.data.convert <records.json> --images <image folder> --out {root}"
        )
    if not urls:
        raise ValueError("the data config names no shards: set data.train_shards, val_shards or test_shards")
    return urls
