"""Where a run's inputs came from: content hashes of checkpoints, data shards and model state.

Recorded in every run's fingerprint (``base_checkpoint``, ``init_sha256``, ``data_digest``) so
that reports can refuse to mix runs of different base models or data sets, and used by the
feedback cache key (:mod:`avglab.avg.feedback_cache`) so that stale feedback is never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from omegaconf import OmegaConf

from avglab.data.jsonstream import file_sha256

WEIGHTS = "core.safetensors"
ROUTER_ONLY = (["router"],)  # stage.train of stages that keep the LMM frozen (4, Gumbel, cached)


def checkpoint_sha256(folder: str | Path) -> str:
    """SHA-256 of a stage output's ``core.safetensors`` (its file contents)."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no stage output weights to hash")
    return file_sha256(path)


def base_checkpoint(init: str | Path | None) -> dict | None:
    """The checkpoint whose LMM a run evaluates: ``init`` minus router-only stages.

    A router-only stage (``stage.train == [router]``: RGLF, its cached form, Gumbel) keeps the LMM
    of its own input, so its output's base is its input's base. For a routed evaluation this is
    the stage-3 output that the router was trained on; for a fixed or random selector it is
    ``init`` itself.

    Args:
        init: a stage output folder (holding ``core.safetensors``, ``meta.json``, ``config.yaml``).

    Returns:
        ``{"path", "sha256"}`` or None without ``init``.
    """
    if init is None:
        return None
    folder = Path(init)
    config, meta = folder / "config.yaml", folder / "meta.json"
    if config.is_file() and meta.is_file():
        train = OmegaConf.to_container(OmegaConf.load(config).stage.get("train", []))
        prints = json.loads(meta.read_text()).get("fingerprint", {})
        if train in ROUTER_ONLY:
            if prints.get("base_checkpoint"):
                return prints["base_checkpoint"]
            if prints.get("init_from"):
                return base_checkpoint(prints["init_from"])
    return {"path": str(folder.resolve()), "sha256": checkpoint_sha256(folder)}


def manifest_sha256s(urls: Iterable[str]) -> dict[str, str]:
    """Shard checksums listed by converter manifests (``<split>.manifest.json``) next to the shards."""
    known: dict[str, str] = {}
    for folder in {Path(u).parent for u in urls}:
        for manifest in folder.glob("*.manifest.json"):
            data = json.loads(manifest.read_text(encoding="utf-8"))
            for shard in data.get("shards", []):
                if isinstance(shard, dict) and shard.get("sha256") and shard.get("name"):
                    known[str(folder / shard["name"])] = shard["sha256"]
    return known


def shards_digest(urls: Iterable[str]) -> str:
    """One hash over the contents of shards, in order.

    A shard's SHA-256 comes from its converter manifest when listed there (no re-read of large
    data sets), else from its bytes (the generated synth shards are a few MB).
    """
    urls = list(urls)
    known = manifest_sha256s(u for u in urls if "://" not in u)
    digest = hashlib.sha256()
    for url in urls:
        if "://" in url:
            raise ValueError(f"{url}: remote shards cannot be hashed; copy them locally first")
        digest.update(Path(url).name.encode())
        digest.update((known.get(str(Path(url))) or file_sha256(Path(url))).encode())
    return digest.hexdigest()


def data_digest(urls: Mapping[str, Iterable[str]]) -> dict[str, str]:
    """Per split (train/val/test), the :func:`shards_digest` of its shards."""
    return {split: shards_digest(paths) for split, paths in sorted(urls.items()) if paths}


def state_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state: every tensor's name, dtype, shape and bytes, in key order."""
    return tensors_sha256(module.state_dict())


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (a state dict): every name, dtype, shape and bytes, in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
