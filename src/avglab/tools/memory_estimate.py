"""Analytic memory of the paper's 7B setting per stage and strategy, without downloading a weight.

Parameter counts are exact: the llava-v1.6-vicuna-7b-hf architecture and the configured router
are built on the meta device. Activation bytes per token come from real layers of the 7B widths
(uninitialised CPU memory, bf16, a few short sequences), counting the unique storages autograd
saves for backward, fitted as ``a*S + b*S^2`` per layer; the sequence lengths are LLaVA-NeXT's
for a 672x672 image (2928/1488/744/384/192 visual tokens) plus the text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

from avglab.avg.router import GranularityRouter
from avglab.core.seqpack import first_fit_rows

GB = 1024**3
LEVELS = [36, 72, 144, 288, 576]
TOKENS_672 = [192, 384, 744, 1488, 2928]  # visual tokens of a 672x672 image per level, coarse to fine
TILES_672 = 5  # global view + 2x2 local tiles
STAGE_TRAINS = {
    "pretrain": ("projector",),
    "instruct": ("vision", "projector", "newline", "llm"),
    "multigran": ("vision", "projector", "newline", "llm"),
    "rglf": ("router",),
}


def vicuna_7b_config() -> LlavaNextConfig:
    """llava-hf/llava-v1.6-vicuna-7b-hf's architecture, written out (no download)."""
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=32000,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def parameter_counts(router_ffn: int | None = None, router_heads: int = 4, k: int = 32) -> dict[str, int]:
    """Exact parameters per part of the 7B core (meta device: no memory)."""
    config = vicuna_7b_config()
    with torch.device("meta"):
        llava = LlavaNextForConditionalGeneration(config)
        router = GranularityRouter(4096, LEVELS, k=k, num_heads=router_heads, ffn_size=router_ffn)
    model = llava.model
    layers = model.vision_tower.encoder.layers
    unused = sum(p.numel() for p in layers[-1].parameters())
    unused += sum(p.numel() for p in model.vision_tower.post_layernorm.parameters())

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "vision": count(model.vision_tower) - unused,
        "vision_unused": unused,
        "projector": count(model.multi_modal_projector),
        "newline": model.image_newline.numel(),
        "llm": count(model.language_model) + count(llava.lm_head),
        "router": count(router),
    }


def saved_bytes(run, params: set[int]) -> int:
    """Bytes of the unique storages autograd saves while ``run()`` builds its graph (parameters excluded)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(seen.values())


def fit_per_layer(layer: nn.Module, make_input, lengths=(32, 64, 128)) -> tuple[float, float]:
    """(bytes per token, bytes per token^2) saved by one layer, fitted on a few sequence lengths."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    points = [(s, saved_bytes(lambda s=s: layer(*make_input(s)), params)) for s in lengths]
    (s1, b1), (s2, b2), (s3, b3) = points
    quad = ((b3 - b2) / (s3 - s2) - (b2 - b1) / (s2 - s1)) / (s3 - s1)
    lin = (b2 - b1) / (s2 - s1) - quad * (s1 + s2)
    return lin, max(quad, 0.0)


def real_layer(module: nn.Module) -> nn.Module:
    """A meta-built layer in uninitialised bf16 CPU memory, in training mode (values are irrelevant)."""
    return module.to_empty(device="cpu").to(torch.bfloat16).train()


@dataclass
class LayerCost:
    """Saved-activation bytes of one layer as ``lin*S + quad*S^2`` per sequence of S tokens."""

    lin: float
    quad: float

    def bytes(self, length: int) -> float:
        """Bytes for one sequence of ``length`` tokens."""
        return self.lin * length + self.quad * length**2


def calibrate(router_ffn: int | None = None, router_heads: int = 4) -> dict[str, LayerCost]:
    """Per-layer activation costs at the 7B widths: LLaMA (trained and frozen), CLIP, router."""
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = vicuna_7b_config()
    text = config.text_config
    text._attn_implementation = "sdpa"
    with torch.device("meta"):
        llama = LlamaDecoderLayer(text, 0)
        clip_cfg = config.vision_config
        clip_cfg._attn_implementation = "sdpa"
        clip = CLIPEncoderLayer(clip_cfg)
        router = GranularityRouter(4096, LEVELS, k=32, num_heads=router_heads, ffn_size=router_ffn)
    rope = LlamaRotaryEmbedding(text)
    llama, clip, router_layer = real_layer(llama), real_layer(clip), real_layer(router.layer)

    def llama_input(s: int):
        x = torch.zeros(1, s, 4096, dtype=torch.bfloat16, requires_grad=True)
        pos = torch.arange(s)[None]
        cos, sin = rope(x, pos)
        return x, None, pos, None, False, (cos.to(x.dtype), sin.to(x.dtype))

    costs = {"llm_trained": LayerCost(*fit_per_layer(llama, llama_input))}
    for p in llama.parameters():
        p.requires_grad_(False)  # stage 1: frozen LLM, gradients still flow to the projector
    costs["llm_frozen"] = LayerCost(*fit_per_layer(llama, llama_input))
    clip_input = lambda s: (torch.zeros(1, s, 1024, dtype=torch.bfloat16, requires_grad=True), None)  # noqa: E731
    costs["vision_trained"] = LayerCost(*fit_per_layer(clip, clip_input))
    router_input = lambda s: (torch.zeros(1, s, 4096, dtype=torch.bfloat16, requires_grad=True),)  # noqa: E731
    costs["router"] = LayerCost(*fit_per_layer(router_layer, router_input))
    return costs


def activation_gb(stage: str, costs: dict[str, LayerCost], text_tokens: int, checkpointing: bool) -> dict:
    """Saved activations of one 672x672 sample in a stage (GB), and the LLM tokens they cover."""
    layers, vision_layers, hidden = 32, 23, 4096
    finest = TOKENS_672[-1] + text_tokens
    if stage == "multigran":  # N variants in ONE LLM pass, packed into rows as long as the finest (seqpack)
        rows = first_fit_rows([n + text_tokens for n in TOKENS_672], finest)
        lengths = [finest] * len(rows)
    elif stage == "rglf":  # feedback runs without grad: no LLM activations are kept
        lengths = []
    else:
        lengths = [finest]
    llm = costs["llm_frozen" if stage == "pretrain" else "llm_trained"]
    if checkpointing:  # keep only each layer's input (bf16), recompute one layer at a time
        per_layer = [2 * hidden * n for n in lengths]
        llm_bytes = layers * sum(per_layer) + sum(llm.bytes(n) for n in lengths)
    else:
        llm_bytes = layers * sum(llm.bytes(n) for n in lengths)
    vision_bytes = 0.0
    if stage in ("instruct", "multigran"):  # the vision encoder trains: ONE pass over the 5 tiles
        vision_bytes = TILES_672 * vision_layers * costs["vision_trained"].bytes(577)
    router_bytes = TILES_672 * costs["router"].bytes(sum(LEVELS) + 32) if stage == "rglf" else 0.0
    return {
        "llm_gb": llm_bytes / GB,
        "vision_gb": vision_bytes / GB,
        "router_gb": router_bytes / GB,
        "total_gb": (llm_bytes + vision_bytes + router_bytes) / GB,
        "llm_tokens_padded": sum(lengths),
        "llm_tokens_unpadded": sum(TOKENS_672) + len(TOKENS_672) * text_tokens
        if stage == "multigran"
        else sum(lengths),
    }


def state_gb(total: int, trainable: int, strategy: str, world: int, root: int, layer: int) -> float:
    """Weights + gradients + AdamW state per GPU (GB), bf16 compute over fp32 master weights.

    ``ddp``: fp32 weights, grads and Adam moments replicated. ``fsdp``/``fsdp2`` (full shard):
    all of it over ``world`` plus the unsharded root unit (embeddings, LM head, projector,
    router) and one gathered layer in fp32. ``zero2``: bf16 weights replicated, fp32 master
    weights, moments and bf16 grads sharded. ``zero3``: everything sharded plus one bf16 layer.
    """
    if strategy == "ddp":
        size = 4 * total + 4 * trainable + 8 * trainable
    elif strategy in ("fsdp", "fsdp2"):
        size = (4 * total + 12 * trainable) / world + 4 * (root + layer) * 2
    elif strategy == "zero2":
        size = 2 * total + (4 + 8 + 2) * trainable / world
    elif strategy == "zero3":
        size = (2 * total + 14 * trainable) / world + 2 * layer
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    return size / GB
