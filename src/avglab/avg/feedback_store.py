"""Where a feedback cache lives: one folder per key, verified before reuse, written atomically.

A stored cache (``<root>/<key>/{cache.safetensors,meta.json,spec.json}``) is checked against the
requested spec and for consistent tensors before it is used; a damaged one is logged, moved aside and
rebuilt; a new one is written to a temporary folder and renamed, so a crash never leaves half a cache
under its key. What the cache holds and how it is computed: :mod:`avglab.avg.feedback_cache`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from avglab.avg.feedback_cache import TENSORS, FeedbackCache, cache_key

log = logging.getLogger(__name__)


def cache_folder(root: Path, spec: dict) -> Path:
    """``root/<key>``."""
    return Path(root) / cache_key(spec)


class DamagedCacheError(ValueError):
    """A stored cache that does not load or whose tensors do not fit together and its spec."""


def cache_problem(tensors: dict[str, torch.Tensor], meta: dict, spec: dict) -> str | None:
    """Why stored tensors cannot be the cache of ``spec``, or None when they are consistent.

    Checks the tensor names, every tensor's rank and dtype, that per-sample tensors have one row per
    cached id (``spec["samples"]`` when given), that the feedback has one column per granularity
    (``spec["granularities"]`` when given) and that the tile and instruction counts add up to the
    stored tiles and instruction tokens.
    """
    names = set(tensors)
    if names != set(TENSORS):
        return f"tensors {sorted(names)} instead of {sorted(TENSORS)}"
    t = tensors
    ranks = {"tiles": 4, "instruction": 2, "feedback": 2, "tokens": 2}
    wrong = [f"{k} {tuple(t[k].shape)}" for k, v in ranks.items() if t[k].dim() != v]
    wrong += [f"{k} {tuple(t[k].shape)}" for k in TENSORS if k not in ranks and t[k].dim() != 1]
    if wrong:
        return "tensors of the wrong rank: " + ", ".join(wrong)
    if t["has_image"].dtype != torch.bool or not all(
        t[k].dtype == torch.long for k in ("tile_counts", "instruction_counts", "tokens")
    ):
        return "tensors of the wrong dtype"
    samples = len(meta.get("ids", []))
    if spec.get("samples") is not None and samples != spec["samples"]:
        return f"meta.json lists {samples} ids, the spec asks for {spec['samples']} samples"
    per_sample = ("feedback", "tokens", "has_image", "tile_counts", "instruction_counts")
    rows = {k: len(t[k]) for k in per_sample}
    if set(rows.values()) != {samples}:
        return f"per-sample tensors do not have one row per cached sample ({samples}): {rows}"
    levels = len(spec.get("granularities") or []) or t["feedback"].shape[1]
    if t["feedback"].shape[1] != levels or t["tokens"].shape != t["feedback"].shape:
        return (
            f"feedback {tuple(t['feedback'].shape)} and tokens {tuple(t['tokens'].shape)} do not have "
            f"one column per granularity ({levels})"
        )
    if (t["tile_counts"] < 0).any() or int(t["tile_counts"].sum()) != len(t["tiles"]):
        return f"tile counts add up to {int(t['tile_counts'].sum())}, {len(t['tiles'])} tiles are stored"
    if (t["instruction_counts"] < 0).any() or int(t["instruction_counts"].sum()) != len(t["instruction"]):
        return (
            f"instruction counts add up to {int(t['instruction_counts'].sum())}, "
            f"{len(t['instruction'])} instruction tokens are stored"
        )
    if t["tiles"].shape[2] != t["tiles"].shape[3] or (
        len(t["instruction"]) and t["instruction"].shape[1] != t["tiles"].shape[1]
    ):
        return f"tiles {tuple(t['tiles'].shape)} and instruction {tuple(t['instruction'].shape)} do not match"
    return None


def read_cache(folder: Path, spec: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors and facts of ``folder``, verified against ``spec``.

    Raises:
        DamagedCacheError: a file is missing or does not load, or :func:`cache_problem` finds one.
        ValueError: the folder holds another (readable) spec: a key collision or an edited file.
    """
    try:
        found = json.loads((folder / "spec.json").read_text())
    except (OSError, ValueError) as exn:
        raise DamagedCacheError(f"spec.json does not load ({exn})") from None
    if found != spec:
        changed = sorted(k for k in set(found) | set(spec) if found.get(k) != spec.get(k))
        raise ValueError(f"feedback cache {folder} holds another spec (differs in {changed}); delete it")
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exn:
        raise DamagedCacheError(f"meta.json does not load ({exn})") from None
    try:
        tensors = load_file(str(folder / "cache.safetensors"))
    except Exception as exn:  # safetensors raises its own SafetensorError for a cut or garbled file
        raise DamagedCacheError(f"cache.safetensors does not load ({exn})") from None
    problem = cache_problem(tensors, meta, spec)
    if problem is not None:
        raise DamagedCacheError(problem)
    return tensors, meta


def discard_damaged(folder: Path, why: str) -> None:
    """Moves a damaged cache folder aside and deletes it, so the cache is rebuilt under its key.

    Raises:
        ValueError: it cannot be moved; the message names the folder and how to clear it.
    """
    aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return  # another process moved it first and rebuilds too
    except OSError as exn:
        raise ValueError(
            f"feedback cache {folder} is damaged ({why}) and cannot be moved aside ({exn}); delete it "
            f"(rm -r {folder}) and run again: it is rebuilt"
        ) from None
    shutil.rmtree(aside, ignore_errors=True)


def load_or_build(root: Path, spec: dict, build) -> tuple[FeedbackCache, bool]:
    """The cache of ``spec`` from ``root``, computing and storing it first if absent.

    A stored cache is verified before use (:func:`read_cache`): a damaged one (cut short, tensors of
    the wrong shape, unreadable files) is logged with what is wrong, discarded and rebuilt.

    Args:
        root: cache root folder (``${workspace}/cache/feedback`` by default).
        spec: from :func:`cache_spec`; its key names the folder and it is stored next to the tensors.
        build: callable returning ``(tensors, facts)`` (see :func:`compute_cache`).

    Returns:
        The cache and whether it was built now (False: reused).

    Raises:
        ValueError: the folder exists but holds another spec (a key collision or an edited file), or
            it is damaged and cannot be cleared (the message says how).
    """
    folder = cache_folder(root, spec)
    stored = folder / "spec.json"
    if stored.is_file():
        try:
            tensors, meta = read_cache(folder, spec)
            return FeedbackCache(tensors, {**meta, "spec": spec}), False
        except DamagedCacheError as exn:
            log.warning("feedback cache %s is damaged (%s): rebuilding it", folder, exn)
            discard_damaged(folder, str(exn))
    start = time.perf_counter()
    tensors, facts = build()
    facts["build_seconds"] = time.perf_counter() - start
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:  # written aside, then renamed: a crash never leaves a half cache under the key
        save_file(tensors, str(tmp / "cache.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(facts, indent=1))
        (tmp / "spec.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
        try:
            tmp.rename(folder)
        except OSError:
            if not stored.is_file():
                raise
            shutil.rmtree(tmp)  # another process stored the same spec first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("feedback cache %s: %d samples in %.1f s", folder, len(facts["ids"]), facts["build_seconds"])
    return FeedbackCache(tensors, {**facts, "spec": spec}), True
