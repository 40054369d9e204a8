"""Builds the pieces a run needs from the composed config: tokenizer, model, selector, data."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from avglab.avg.losses import TOKEN_COST_SCALES
from avglab.avg.router import GranularityRouter, check_input_levels
from avglab.core.builders import TINY_MAX_POSITIONS, pretrained_llava, tiny_llava
from avglab.core.hub import check_geometry, load_image_processor, load_llava_config, load_tokenizer
from avglab.core.model import AvgCore
from avglab.core.scaler import GranularityScaler
from avglab.core.selector import FixedSelector, RandomSelector
from avglab.data.datamodule import ShardDataModule
from avglab.data.processor import build_image_processor
from avglab.data.sources import shard_urls
from avglab.data.synth.config import SynthConfig
from avglab.data.synth.generator import ensure_synth_shards, synth_vocabulary
from avglab.data.tokenizer import cached_word_tokenizer
from avglab.data.vocabulary import shard_digest, shard_vocabulary
from avglab.focus.build import build_focus_core, check_focus, focus_enabled

log = logging.getLogger(__name__)
SELECTORS = ("avg", "image_only", "fixed", "random", "none")


def synth_config(data: DictConfig) -> SynthConfig:
    """The generator's config from ``data.synth``."""
    return SynthConfig(**OmegaConf.to_container(data.synth, resolve=True))


def model_grid(model: DictConfig) -> int:
    """Tokens per tile side, known before any weight is loaded (for early config errors)."""
    if model.builder == "tiny":
        return model.tile_size // model.patch_size
    vision = checkpoint_config(model).vision_config
    return vision.image_size // vision.patch_size


def checkpoint_config(model: DictConfig):
    """A pretrained checkpoint's LLaVA-NeXT config, checked against ``model.tile_size`` etc."""
    if model.builder != "pretrained":
        raise ValueError(f"model.builder={model.builder!r}: choose tiny or pretrained")
    if not model.path:
        raise ValueError("model.builder=pretrained needs model.path=<hub id or checkpoint folder>")
    config = load_llava_config(model.path)
    check_geometry(model, config)
    return config


def check_router(cfg: DictConfig, grid: int) -> None:
    """Fails on a router config that cannot work, naming the key, before the model is built."""
    router = cfg.router
    if router.kind not in SELECTORS:
        raise ValueError(f"router.kind={router.kind!r}: choose one of {SELECTORS}")
    GranularityScaler(grid, list(router.granularities))  # raises on granularities off the grid
    if router.get("token_cost_scale", "linear") not in TOKEN_COST_SCALES:
        raise ValueError(
            f"router.token_cost_scale={router.token_cost_scale!r}: choose one of {TOKEN_COST_SCALES}"
        )
    if router.kind in ("avg", "image_only"):
        check_input_levels(router.get("input_levels"), len(router.granularities))
    if router.kind == "avg" and router.k < 1:
        raise ValueError(
            f"router.k={router.k}: must be >= 1 (router=image_only routes without instruction tokens)"
        )
    if (
        router.kind == "fixed"
        and router.granularity is not None
        and router.granularity not in router.granularities
    ):
        raise ValueError(
            f"router.granularity={router.granularity} is not one of "
            f"router.granularities={list(router.granularities)}"
        )


def check_max_length(cfg: DictConfig) -> None:
    """Fails when ``data.max_length`` (the whole spliced sequence) exceeds the LLM's positions."""
    data = cfg.get("data")
    if data is None or data.get("max_length") is None:
        return
    m = cfg.model
    positions = (
        TINY_MAX_POSITIONS
        if m.builder == "tiny"
        else checkpoint_config(m).text_config.max_position_embeddings
    )
    if data.max_length > positions:
        raise ValueError(
            f"data.max_length={data.max_length} exceeds the LLM's max_position_embeddings={positions} "
            f"(model={m.name}); data.max_length counts the whole sequence with the visual tokens spliced "
            f"in, so set data.max_length<={positions}"
        )


def build_tokenizer(cfg: DictConfig):
    """A checkpoint's own tokenizer, or for ``model=tiny`` a word-level one over the data's words."""
    if cfg.model.builder != "tiny":
        return load_tokenizer(cfg.model.path, checkpoint_config(cfg.model))
    data, cache = cfg.data, Path(cfg.workspace) / "tokenizers"
    if data.kind == "synth":  # the generator's vocabulary: the demo's tokenizer and folder, as ever
        words = synth_vocabulary(synth_config(data))
        digest = hashlib.sha256(json.dumps(sorted(words)).encode()).hexdigest()[:12]
        return cached_word_tokenizer(cache / digest, lambda: words)
    if data.kind == "shards":  # every split's text, read once; the folder is named by the shards' content
        urls = shard_urls(data)
        return cached_word_tokenizer(
            cache / shard_digest(urls, data.template),
            lambda: shard_vocabulary(urls, data.template, str(data.root)),
        )
    raise ValueError(f"data.kind={data.kind!r}: choose synth or shards")


def saved_tokenizer(cfg: DictConfig, folder: str | Path | None):
    """The tokenizer a ``model=tiny`` stage output was trained with, or None.

    A tiny model's word vocabulary comes from the data its first stage read; later stages, evaluation
    and export must keep those ids even when they read other data (new words are then counted as
    unknown, never re-numbered). A checkpoint model always loads its own tokenizer.
    """
    if cfg.model.builder != "tiny" or folder is None or not (Path(folder) / "tokenizer.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def build_llava(cfg: DictConfig, tokenizer):
    """The LLaVA-NeXT model: tiny random (seeded) or a pretrained checkpoint."""
    m = cfg.model
    if m.builder == "tiny":
        return tiny_llava(
            vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id,
            tile_size=m.tile_size,
            patch_size=m.patch_size,
            grid_pinpoints=OmegaConf.to_container(m.grid_pinpoints),
            vision_hidden=m.vision_hidden,
            vision_layers=m.vision_layers,
            text_hidden=m.text_hidden,
            text_layers=m.text_layers,
            text_heads=m.get("text_heads", 4),
            text_init_range=m.get("text_init_range", 0.02),
            vision_position_init=m.get("vision_position_init", "clip"),
            vision_stem=m.get("vision_stem", "patch"),
            seed=cfg.seed,
            attn_implementation=m.get("attn_implementation"),
            gradient_checkpointing=m.get("gradient_checkpointing", False),
        )
    checkpoint_config(m)  # geometry checked before the weights are read
    return pretrained_llava(
        m.path, m.dtype, m.get("attn_implementation"), m.get("gradient_checkpointing", False)
    )


def build_image_processor_for(model: DictConfig, llava):
    """The AnyRes image processor: the checkpoint's own, or for ``model=tiny`` one built to its tiles."""
    if model.builder == "tiny":
        vision = llava.config.vision_config
        return build_image_processor(vision.image_size, llava.config.image_grid_pinpoints)
    return load_image_processor(model.path, llava.config)


def build_selector(router: DictConfig, hidden_size: int) -> nn.Module | None:
    """The configured selector over ``router.granularities``."""
    levels = list(router.granularities)
    if router.kind in ("avg", "image_only"):
        return GranularityRouter(
            hidden_size,
            levels,
            k=router.k if router.kind == "avg" else 0,
            num_heads=router.num_heads,
            ffn_size=router.ffn_size,
            mlp_size=router.mlp_size,
            dropout=router.dropout,
            input_levels=router.get("input_levels"),  # cheaper variants; null = the paper
            width=router.get("width"),
        )
    if router.kind == "fixed":
        granularity = router.granularity if router.granularity is not None else levels[-1]
        return FixedSelector(len(levels), levels.index(granularity))
    if router.kind == "random":
        return RandomSelector(len(levels), router.seed)
    return None


def build_core(cfg: DictConfig, tokenizer=None):
    """Tokenizer, image processor and the core, after the router (or FocusLLaVA) config has been checked.

    ``tokenizer`` replaces :func:`build_tokenizer`'s, e.g. the one a tiny model was trained with
    when it now reads other data (its word vocabulary is then not this data's).
    """
    focus = focus_enabled(cfg)  # FocusLLaVA (METHOD 2) replaces the router: focus=vision|text|both
    if focus:
        check_focus(cfg)
    else:
        check_router(cfg, model_grid(cfg.model))
    check_max_length(cfg)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    llava = build_llava(cfg, tokenizer)
    image_processor = build_image_processor_for(cfg.model, llava)
    if focus:
        return tokenizer, image_processor, build_focus_core(cfg.focus, llava, list(cfg.router.granularities))
    selector = build_selector(cfg.router, llava.config.text_config.hidden_size)
    return tokenizer, image_processor, AvgCore(llava, list(cfg.router.granularities), selector)


def build_datamodule(
    cfg: DictConfig,
    tokenizer,
    image_processor,
    eval_batch_size: int | None = None,
    batch_size: int | None = None,
):
    """The WebDataset datamodule over the configured shards (synth shards are written on first use).

    ``data.kind=shards`` reads ``data.<split>_shards`` globs under ``data.root`` (converter output,
    see ``python -m avglab.data.convert``) and the sample counts of their manifests.
    ``data.max_length`` counts the whole sequence the LLM reads, the image's visual tokens at the
    finest level included (the model's grid tells the processor how many there are).
    """
    data = cfg.data
    if data.kind == "synth":
        urls = ensure_synth_shards(synth_config(data), Path(data.root))
    elif data.kind == "shards":
        urls = shard_urls(data)
    else:
        raise ValueError(f"data.kind={data.kind!r}: choose synth or shards")
    return ShardDataModule(
        urls=urls,
        tokenizer=tokenizer,
        image_processor=image_processor,
        template=data.template,
        batch_size=batch_size if batch_size is not None else data.batch_size,  # only null falls back
        eval_batch_size=eval_batch_size if eval_batch_size is not None else data.eval_batch_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        seed=cfg.seed,
        max_length=data.max_length,
        grid=model_grid(cfg.model),
        epoch_samples=data.epoch_samples,
        max_skip_fraction=data.max_skip_fraction,
        shard_sizes=known_counts(urls),
    )


def known_counts(urls: dict[str, list[str]]) -> dict[str, int]:
    """Samples per shard from the manifests beside the shards; logs the shards whose count is unknown.

    Without a count a truncated shard's loss cannot be counted exactly (see
    :class:`~avglab.data.skips.ShardReader`), so the run says so once, up front.
    """
    from avglab.data.shardset import read_manifests
    from avglab.data.skips import COUNTS_UNKNOWN

    sizes = read_manifests([u for split in urls.values() for u in split])
    unknown = {split: sum(u not in sizes for u in shards) for split, shards in urls.items()}
    unknown = {split: n for split, n in unknown.items() if n}
    if unknown:
        log.warning(
            "counts unknown: %s shard(s) per split have no per-shard sample count (no *.manifest.json lists "
            "them), so samples lost to a broken shard are counted once per shard under %s, not exactly; "
            "convert the data with python -m avglab.data.convert for exact counts",
            unknown,
            COUNTS_UNKNOWN,
        )
    return sizes
