"""Named builders of the LLaVA-NeXT model: a tiny random one and pretrained checkpoints."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration


def tiny_llava(
    vocab_size: int,
    image_token_id: int,
    pad_token_id: int = 0,
    tile_size: int = 64,
    patch_size: int = 8,
    grid_pinpoints: list[list[int]] | None = None,
    vision_hidden: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 4,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_heads: int = 4,
    seed: int = 0,
) -> LlavaNextForConditionalGeneration:
    """A randomly initialised LLaVA-NeXT small enough to train on a laptop CPU in minutes.

    Same classes as the 7B checkpoints (CLIP vision tower, 2-layer GELU projector, LLaMA), so every
    code path the tiny model exercises is the one real checkpoints take. The vision feature layer
    is -2 with the CLS token dropped, as in LLaVA-NeXT.
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
        max_position_embeddings=4096,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
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
    model.eval()
    return model


def pretrained_llava(
    path_or_id: str, dtype: str = "float32", attn_implementation: str | None = None
) -> LlavaNextForConditionalGeneration:
    """Loads a Hugging Face LLaVA-NeXT checkpoint (hub id or local folder) without network surprises.

    Raises:
        FileNotFoundError: when the weights are not on this machine, saying how to get them.
    """
    try:
        return LlavaNextForConditionalGeneration.from_pretrained(
            path_or_id, dtype=getattr(torch, dtype), attn_implementation=attn_implementation
        )
    except OSError as err:
        raise FileNotFoundError(
            f"model.path={path_or_id!r} could not be loaded ({err}). Download it once on a machine with "
            f"network access (`huggingface-cli download {path_or_id}`) into HF_HOME, or give a local "
            "folder written by save_pretrained; HF_HUB_OFFLINE=1 keeps avglab from trying the network."
        ) from err
