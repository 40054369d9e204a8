"""Feedback cache for stage 4: the frozen LMM's answer scores and the router's frozen inputs.

RGLF keeps vision tower, projector and LLM frozen (METHOD 1.3), so per sample
- the feedback r (N,) of Eq. 4 (mean answer log-prob at every granularity) and the visual token
  counts (N,) behind ``router.token_cost``,
- the finest projected tiles (T, C, grid, grid) (the scaler has no parameters, so every level is
  re-pooled from them exactly as ``AvgCore.encode`` does),
- the user's instruction embeddings (Q, C) (the frozen embedding table; pitfall 3),
do not depend on any router hyperparameter. The router's first trainable layer is its Transformer
layer (METHOD 1.2 step 3); the instruction filter before it (step 1) is parameter-free but depends
on ``router.k``, so it runs at training time on the cached tensors. One cache therefore serves
every ``router.k`` (image-only included), ``stage.alpha``, ``stage.rank_weight``, ``tie_eps``,
``router.token_cost`` (applied after the cache, :func:`~avglab.avg.losses.apply_token_cost`),
learning rate and seed. Text-only samples keep their place in shard order but carry no routing
preference (pitfall 7): they are not scored (feedback NaN) and store no tile and no instruction token.

The key hashes everything the cached tensors depend on: the LMM weights as loaded (all tensors of
``core.llava``), the shard contents of the split, sample count, granularities, template, text and
image settings, tokenizer files and the source code that computes the scores. A folder whose
stored spec differs from the requested one is never used. Storing, verifying and reusing a cache
is :mod:`avglab.avg.feedback_store`'s job.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from avglab.core.model import AvgCore
from avglab.core.provenance import shards_digest, state_sha256
from avglab.data.rates import RateMeter

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the stored tensors change meaning (2: text-only rows NaN, no instruction)
SCORING_SOURCES = (  # modules whose code decides the cached tensors (their text is part of the key)
    "avglab.avg.feedback_cache",
    "avglab.core.model",
    "avglab.core.scaler",
    "avglab.core.packing",
    "avglab.data.processor",
    "avglab.data.templates",
    "avglab.data.collate",
)
TENSORS = ("tiles", "tile_counts", "instruction", "instruction_counts", "feedback", "tokens", "has_image")


def code_digest() -> str:
    """SHA-256 over the source files of :data:`SCORING_SOURCES`."""
    import importlib

    digest = hashlib.sha256(f"cache-v{CACHE_VERSION}".encode())
    for name in SCORING_SOURCES:
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of the tokenizer's vocabulary and special tokens."""
    blob = json.dumps(
        {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_spec(core: AvgCore, datamodule, split: str, samples: int) -> dict:
    """Everything the cached tensors of ``samples`` samples of ``split`` depend on.

    Args:
        core: the core whose frozen LMM scores the samples.
        datamodule: the run's ``ShardDataModule`` (shards, tokenizer, processor, template).
        split: "train" or "val".
        samples: samples taken from the start of the split, in shard order.
    """
    urls = datamodule.urls.get(split) or []
    if not urls:
        raise ValueError(f"stage.cache_{split}_samples > 0 but the data has no {split} split")
    processor = datamodule.processor
    image_processor = processor.image_processor
    return {
        "version": CACHE_VERSION,
        "llava_sha256": state_sha256(core.llava),
        "split": split,
        "shards": [Path(u).name for u in urls],
        "shards_sha256": shards_digest(urls),
        "samples": int(samples),
        "granularities": list(core.scaler.granularities),
        "template": getattr(processor.template, "name", str(processor.template)),
        "max_length": processor.max_length,
        "grid": processor.grid,  # max_length counts the visual tokens of this grid (spliced length)
        "tokenizer_sha256": tokenizer_digest(processor.tokenizer),
        "image_processor": json.loads(image_processor.to_json_string()),
        "dtype": str(next(core.llava.parameters()).dtype),
        "code_sha256": code_digest(),
        "torch": torch.__version__,
    }


def cache_key(spec: dict) -> str:
    """Folder name of a spec: 20 hex digits of its SHA-256."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def compute_cache(
    core: AvgCore,
    batches: Iterator[dict],
    samples: int,
    key: str = "stage.cache_train_samples",
    skipped: Counter | None = None,
) -> tuple[dict, dict]:
    """Runs the frozen core over batches until ``samples`` samples are scored.

    One vision pass and one batched LLM pass over all N levels of the samples with an image per
    batch (pitfall 6), exactly what ``RglfStage.feedback`` computes.

    Args:
        core: the frozen core.
        batches: collate batches in shard order.
        samples: samples to cache.
        key: the config key that asked for ``samples`` (named in the error).
        skipped: the reader's skip counts (quoted in the error), if known.

    Returns:
        The tensors (see :class:`FeedbackCache`) and JSON facts (ids, question types, text-only count).

    Raises:
        ValueError: the batches ran out before ``samples`` samples; names ``key`` and the count.
    """
    was_training = core.training
    core.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in TENSORS}
    ids: list[str] = []
    types: list[str] = []
    meter, shown = RateMeter(), 0  # a line every 10% of the samples (scoring N levels is slow)
    try:
        for batch in batches:
            tiles, owner = core.project(batch["pixel_values"], batch["image_sizes"], batch["has_image"])
            encoded = core.pyramid(tiles, owner, batch["has_image"])
            scores = core.level_feedback(batch, encoded)  # Eq. 4: (B, N), NaN rows for text-only
            tokens = core.token_counts(batch["image_sizes"].cpu(), batch["has_image"].cpu())
            embeds = core.llava.get_input_embeddings()(batch["input_ids"])  # (B, L, C)
            # user tokens only (pitfall 3), and none for text-only samples: the router never reads them
            mask = batch["instruction_mask"].bool() & batch["has_image"].to(embeds.device)[:, None]
            owner = owner.cpu()
            for b in range(len(batch["input_ids"])):
                if len(ids) == samples:
                    break
                mine = owner == b
                parts["tiles"].append(tiles[mine].cpu() if tiles is not None else torch.zeros(0))
                parts["tile_counts"].append(mine.sum().reshape(1))
                parts["instruction"].append(embeds[b][mask[b]].cpu())  # (Q_b, C)
                parts["instruction_counts"].append(mask[b].sum().reshape(1).cpu())
                parts["feedback"].append(scores[b : b + 1].float().cpu())
                parts["tokens"].append(tokens[b : b + 1])
                parts["has_image"].append(batch["has_image"][b : b + 1].cpu())
                ids.append(str(batch["ids"][b]))
                types.append(str(batch["question_type"][b]) if "question_type" in batch else "")
            meter.update(len(ids), len(batch["input_ids"]))
            if len(ids) * 10 // samples > shown:
                shown = len(ids) * 10 // samples
                speed, eta = meter.rates(len(ids), samples)
                log.info("feedback cache (%s): %d/%d samples (%d%%) samples/s %s ETA %s",
                         key, len(ids), samples, 100 * len(ids) // samples, speed, eta)  # fmt: skip
            if len(ids) == samples:
                break
    finally:
        core.train(was_training)
    if len(ids) < samples:
        reasons = f" (skipped while reading: {dict(skipped)})" if skipped else ""
        raise ValueError(
            f"{key}={samples}, but the split gave only {len(ids)} usable samples{reasons}: "
            f"lower {key} to at most {len(ids)}"
        )
    tiles = [t for t in parts["tiles"] if t.numel()]
    grid, width = core.grid, core.config.text_config.hidden_size
    tensors = {
        "tiles": torch.cat(tiles) if tiles else torch.zeros(0, width, grid, grid),
        "tile_counts": torch.cat(parts["tile_counts"]).long(),
        "instruction": torch.cat(parts["instruction"]),
        "instruction_counts": torch.cat(parts["instruction_counts"]).long(),
        "feedback": torch.cat(parts["feedback"]),
        "tokens": torch.cat(parts["tokens"]).long(),
        "has_image": torch.cat(parts["has_image"]).bool(),
    }
    facts = {"ids": ids, "question_types": types, "text_only": int((~tensors["has_image"]).sum())}
    return {k: v.contiguous() for k, v in tensors.items()}, facts


class FeedbackCache(torch.utils.data.Dataset):
    """Cached samples: ``dataset[i]`` is one sample's tensors, :meth:`collate` makes a batch.

    Attributes:
        tiles: (T_total, C, grid, grid) finest projected tiles of every sample.
        tile_counts: (S,) tiles per sample (0 without an image).
        instruction: (Q_total, C) instruction token embeddings of every sample with an image.
        instruction_counts: (S,) instruction tokens per sample (0 without an image).
        feedback: (S, N) frozen-LMM answer scores r (Eq. 4), before any token cost; NaN rows for
            text-only samples and samples without answer tokens.
        tokens: (S, N) visual tokens each level feeds the LLM.
        has_image: (S,).
        meta: the spec and ids of the cached samples.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict):
        missing = [name for name in TENSORS if name not in tensors]
        if missing:
            raise ValueError(f"feedback cache lacks tensors {missing}")
        for name in TENSORS:
            setattr(self, name, tensors[name])
        self.meta = meta
        self.tile_start = torch.cumsum(self.tile_counts, 0) - self.tile_counts
        self.instruction_start = torch.cumsum(self.instruction_counts, 0) - self.instruction_counts

    def __len__(self) -> int:
        return len(self.feedback)

    def __getitem__(self, i: int) -> dict:
        t0, nt = int(self.tile_start[i]), int(self.tile_counts[i])
        q0, nq = int(self.instruction_start[i]), int(self.instruction_counts[i])
        return {
            "tiles": self.tiles[t0 : t0 + nt],
            "instruction": self.instruction[q0 : q0 + nq],
            "feedback": self.feedback[i],
            "tokens": self.tokens[i],
            "has_image": self.has_image[i],
        }

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """Batch of cached samples.

        Returns:
            tiles (T, C, g, g), tile_owner (T,), instruction (B, Q, C) zero-padded,
            instruction_mask (B, Q), feedback (B, N), tokens (B, N), has_image (B,).
        """
        counts = torch.tensor([len(x["tiles"]) for x in items])
        instruction = [x["instruction"] for x in items]
        return {
            "tiles": torch.cat([x["tiles"] for x in items]),
            "tile_owner": torch.repeat_interleave(torch.arange(len(items)), counts),
            "instruction": pad_sequence(instruction, batch_first=True),
            "instruction_mask": pad_sequence(
                [torch.ones(len(x), dtype=torch.bool) for x in instruction], batch_first=True
            ),
            "feedback": torch.stack([x["feedback"] for x in items]),
            "tokens": torch.stack([x["tokens"] for x in items]),
            "has_image": torch.stack([x["has_image"] for x in items]),
        }


def unknown_counts(meta: dict) -> Counter:
    """The ``<unk>`` tokens and samples the reader counted while the cache was built."""
    return Counter(meta.get("unknown", {}))


def skipped_counts(meta: dict) -> Counter:
    """Skip reasons recorded when the cache was built."""
    return Counter(meta.get("skipped", {}))
