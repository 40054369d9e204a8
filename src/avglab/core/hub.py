"""Reading a Hugging Face LLaVA-NeXT checkpoint's config, tokenizer and image processor.

A checkpoint is a hub id (``llava-hf/llava-v1.6-vicuna-7b-hf``) or a local folder written by
``save_pretrained`` (or ``python -m avglab.tools.export``). Everything here honours
``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` at call time and turns "not on this machine" into
:class:`CheckpointNotFoundError`, whose message says what to download and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from transformers import AutoConfig, AutoTokenizer, LlavaNextConfig, LlavaNextImageProcessorPil

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
T = TypeVar("T")


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint is not on this machine; the message says how to get it."""


def offline() -> bool:
    """True when an offline variable is set (read now, not at import as huggingface_hub does)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def hub_kwargs() -> dict:
    """``from_pretrained`` keyword arguments that keep an offline run off the network."""
    return {"local_files_only": True} if offline() else {}


def looks_local(path_or_id: str) -> bool:
    """A folder (existing, absolute, relative or ~) rather than a hub id such as ``org/name``."""
    text = str(path_or_id)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or text.count("/") > 1


def missing_message(path_or_id: str, err: Exception) -> str:
    """What to download and where to put it, for a checkpoint that could not be read."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if looks_local(path_or_id):
        return (
            f"model.path={path_or_id}: no readable LLaVA-NeXT checkpoint there ({reason}). Give a folder "
            "written by save_pretrained or `python -m avglab.tools.export` (config.json, *.safetensors, "
            "tokenizer and processor files), or a hub id such as llava-hf/llava-v1.6-vicuna-7b-hf."
        )
    from huggingface_hub import constants

    state = " (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)" if offline() else ""
    return (
        f"model.path={path_or_id!r} is not on this machine{state}: {reason}\n"
        f"Download it once on a machine with network access, either into a folder:\n"
        f"    hf download {path_or_id} --local-dir /data/models/{path_or_id.split('/')[-1]}\n"
        f"  and run with model.path=/data/models/{path_or_id.split('/')[-1]}, or into the Hugging Face "
        f"cache ({constants.HF_HUB_CACHE}; HF_HOME moves it) and keep model.path={path_or_id}.\n"
        "Set HF_HUB_OFFLINE=1 so that avglab never tries the network."
    )


def from_hub(load: Callable[..., T], path_or_id: str, **kwargs) -> T:
    """Calls ``load(path_or_id, **kwargs)`` offline-aware, with a download hint when it is missing.

    Raises:
        CheckpointNotFoundError: the files are not on this machine (or the network is unreachable).
    """
    try:
        return load(str(path_or_id), **hub_kwargs(), **kwargs)
    except OSError as err:  # transformers reports missing repos, files and connection errors so
        raise CheckpointNotFoundError(missing_message(path_or_id, err)) from err


def load_llava_config(path_or_id: str) -> LlavaNextConfig:
    """The checkpoint's ``LlavaNextConfig``.

    Raises:
        CheckpointNotFoundError: not on this machine.
        ValueError: the checkpoint is not a LLaVA-NeXT model.
    """
    config = from_hub(AutoConfig.from_pretrained, path_or_id)
    if not isinstance(config, LlavaNextConfig):
        raise ValueError(
            f"model.path={path_or_id}: model_type is {config.model_type!r}, avglab needs a LLaVA-NeXT "
            "checkpoint (model_type 'llava_next', e.g. llava-hf/llava-v1.6-vicuna-7b-hf)"
        )
    return config


def load_tokenizer(path_or_id: str, config: LlavaNextConfig):
    """The checkpoint's tokenizer with ``image_token`` and a pad token set.

    The data processor writes ``tokenizer.image_token`` where the image goes, so it must be the
    token whose id is the config's ``image_token_id`` (``<image>`` in llava-hf checkpoints).

    Raises:
        ValueError: the tokenizer and the model disagree on the image token, or there is no pad token.
    """
    tokenizer = from_hub(AutoTokenizer.from_pretrained, path_or_id)
    token = getattr(tokenizer, "image_token", None) or tokenizer.convert_ids_to_tokens(config.image_token_id)
    if token is None or tokenizer.convert_tokens_to_ids(token) != config.image_token_id:
        raise ValueError(
            f"model.path={path_or_id}: the tokenizer's image token {token!r} does not have the model's "
            f"image_token_id {config.image_token_id}; fix tokenizer_config.json or config.json"
        )
    tokenizer.image_token = token
    if tokenizer.pad_token is None:
        pad_id = getattr(config.text_config, "pad_token_id", None)
        if pad_id is None:
            raise ValueError(
                f"model.path={path_or_id}: the tokenizer has no pad token and the config no pad_token_id; "
                "add one (tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize) and save again"
            )
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    return tokenizer


def load_image_processor(path_or_id: str, config: LlavaNextConfig) -> LlavaNextImageProcessorPil:
    """The checkpoint's own AnyRes image processor (PIL backend), checked against its model config.

    Raises:
        ValueError: the processor's tile size or pinpoints differ from the model's.
    """
    processor = from_hub(LlavaNextImageProcessorPil.from_pretrained, path_or_id)
    tile = int(processor.crop_size["height"])
    pinpoints = [list(p) for p in processor.image_grid_pinpoints]
    expected = [list(p) for p in config.image_grid_pinpoints]
    if tile != config.vision_config.image_size or pinpoints != expected:
        raise ValueError(
            f"model.path={path_or_id}: image processor tiles {tile} px with pinpoints {pinpoints}, but the "
            f"model expects {config.vision_config.image_size} px and {expected}; fix the processor config"
        )
    return processor


def check_geometry(model_cfg, config: LlavaNextConfig) -> None:
    """Fails when ``model.tile_size/patch_size/grid_pinpoints`` disagree with the checkpoint.

    Those keys size the generated data and the granularities before any weight is read, so they
    must describe the checkpoint; the message names the override that fixes them.
    """
    vision = config.vision_config
    facts = {
        "tile_size": vision.image_size,
        "patch_size": vision.patch_size,
        "grid_pinpoints": [list(p) for p in config.image_grid_pinpoints],
    }
    for key, actual in facts.items():
        given = model_cfg.get(key)
        given = [list(p) for p in given] if key == "grid_pinpoints" and given is not None else given
        if given is not None and given != actual:
            value = str(actual).replace(" ", "")
            raise ValueError(
                f"model.{key}={given} but checkpoint {model_cfg.path} has {actual}: set model.{key}={value}"
            )
