"""Named builders of the LLaVA-NeXT model: a tiny random one and pretrained checkpoints."""

from __future__ import annotations

import importlib.util

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from avglab.core.conv_stem import install_vision_stem
from avglab.core.hub import from_hub
from avglab.core.position_codes import init_vision_positions
from avglab.core.transformers_names import enable_checkpointing
from avglab.data.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS

TINY_MAX_POSITIONS = 4096  # the tiny LLaMA's max_position_embeddings (data.max_length is checked against it)


def tiny_llava(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int = SPECIAL_TOKENS.index(PAD),
    bos_token_id: int = SPECIAL_TOKENS.index(BOS),
    eos_token_id: int = SPECIAL_TOKENS.index(EOS),
    tile_size: int = 64,
    patch_size: int = 8,
    grid_pinpoints: list[list[int]] | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_heads: int = 4,
    text_init_range: float = 0.02,
    vision_position_init: str = "clip",
    vision_stem: str = "patch",
    seed: int = 0,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> LlavaNextForConditionalGeneration:
    """A randomly initialised LLaVA-NeXT small enough to train on a laptop CPU in minutes.

    Same classes as the 7B checkpoints (CLIP vision tower, 2-layer GELU projector, LLaMA), so every
    code path the tiny model exercises is the one real checkpoints take. The vision feature layer
    is -2 with the CLS token dropped, as in LLaVA-NeXT. ``attn_implementation`` and
    ``gradient_checkpointing`` act as for checkpoints (see :func:`configure_llava`).
    ``vision_position_init`` starts the tower's learned position embeddings from CLIP's random
    draw (``clip``) or from 2D sine-cosine codes (``sincos``, :mod:`avglab.core.position_codes`).
    ``vision_stem`` is CLIP's linear patch map (``patch``) or a convolutional stem (``conv``,
    :mod:`avglab.core.conv_stem`; avglab loads it, transformers alone does not).

    The special-token ids default to those of the word tokenizer
    (:func:`~avglab.data.tokenizer.build_word_tokenizer`); pass another tokenizer's own ids. They go
    to the config and the generation config, so HF ``generate`` stops on ``</s>``, not on
    ``LlamaConfig``'s defaults (bos 1, eos 2: ``<unk>`` and ``<s>`` in the word tokenizer).
    """
    side = tile_size
    pinpoints = grid_pinpoints or [
        [side, 2 * side],
        [2 * side, side],
        [2 * side, 2 * side],
        [3 * side, side],
        [side, 3 * side],
    ]
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=tile_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        max_position_embeddings=TINY_MAX_POSITIONS,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
        initializer_range=text_init_range,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    init_vision_positions(model.model.vision_tower, vision_position_init)
    install_vision_stem(model.model.vision_tower, vision_stem)
    model.eval()
    return configure_llava(model, attn_implementation, gradient_checkpointing)


def resolve_attention(name: str | None) -> str | None:
    """The attention implementation to ask transformers for.

    ``auto`` picks ``flash_attention_2`` when the ``flash_attn`` package and a CUDA device are
    present, else ``sdpa``; ``flash_attention_2`` without the package fails here, saying so.
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"
    if name == "flash_attention_2" and not has_flash:
        raise ImportError(
            "model.attn_implementation=flash_attention_2 needs the flash-attn package on a CUDA machine "
            "(pip install flash-attn --no-build-isolation); use sdpa or auto otherwise"
        )
    return name


def configure_llava(
    model: LlavaNextForConditionalGeneration,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> LlavaNextForConditionalGeneration:
    """Applies the attention implementation and gradient checkpointing switches of ``model.*``.

    Gradient checkpointing is HF's own (non-reentrant), on every decoder and vision encoder layer;
    it only acts on modules in training mode, so frozen parts pay nothing for it.
    """
    attn = resolve_attention(attn_implementation)
    if attn is not None and attn != model.config._attn_implementation:
        model.set_attn_implementation(attn)
    if gradient_checkpointing:
        enable_checkpointing(model)
    return model


def pretrained_llava(
    path_or_id: str,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    gradient_checkpointing: bool = False,
) -> LlavaNextForConditionalGeneration:
    """Loads a Hugging Face LLaVA-NeXT checkpoint (hub id or local folder), safetensors only.

    Args:
        path_or_id: hub id or folder written by ``save_pretrained``.
        dtype: ``float32`` (master weights for training; pair with ``trainer.precision=bf16-mixed``),
            ``bfloat16``/``float16`` (evaluation), or ``auto`` (the dtype stored in the checkpoint).
        attn_implementation: ``sdpa``, ``flash_attention_2``, ``eager`` or ``auto`` (see
            :func:`resolve_attention`).
        gradient_checkpointing: recompute layer activations in the backward pass.

    Raises:
        CheckpointNotFoundError: the weights are not on this machine; the message says how to get them.
    """
    model = from_hub(
        LlavaNextForConditionalGeneration.from_pretrained,
        path_or_id,
        dtype=dtype if dtype == "auto" else getattr(torch, dtype),
        attn_implementation=resolve_attention(attn_implementation),
        use_safetensors=True,  # never unpickle a .bin
    )
    model.eval()
    return configure_llava(model, None, gradient_checkpointing)
