"""FocusLLaVA from the ``focus`` config group: early checks that name the key, then ``FocusCore``."""

from __future__ import annotations

import math

from omegaconf import DictConfig, OmegaConf
from transformers import LlavaNextForConditionalGeneration

from avglab.focus.model import FocusCore
from avglab.focus.regions import FocusConfigError, make_branches
from avglab.focus.text_sampler import TextSampler
from avglab.focus.vision_sampler import SCALINGS, VisionSampler

KINDS = ("none", "vision", "text", "both")
STAGES = ("focus", "eval")


def focus_enabled(cfg: DictConfig) -> bool:
    """Whether the composed config asks for FocusLLaVA (``focus=vision|text|both``)."""
    focus = cfg.get("focus")
    if focus is None:
        return False
    if focus.kind not in KINDS:
        raise FocusConfigError(f"focus.kind={focus.kind!r}: choose one of {KINDS}")
    return focus.kind != "none"


def check_focus(cfg: DictConfig) -> None:
    """Fails on a FocusLLaVA config that cannot work, naming the key, before the model is built.

    Depth-dependent text settings (``focus.text.layer``, ``layer_range``) are checked when the
    sampler is built, once the LLM's depth is known.
    """
    focus = cfg.focus
    if cfg.stage.name not in STAGES:
        raise FocusConfigError(
            f"focus={focus.kind} runs with stage=focus (training) or stage=eval, not stage={cfg.stage.name}; "
            "use focus=none for the AVG-LLaVA stages"
        )
    if focus.kind in ("vision", "both"):
        vision = focus.vision
        branches = make_branches(OmegaConf.to_container(vision.branches), int(vision.window))
        if vision.scaling not in SCALINGS:
            raise FocusConfigError(f"focus.vision.scaling={vision.scaling!r}: choose one of {SCALINGS}")
        if vision.balance_alpha < 0:
            raise FocusConfigError(f"focus.vision.balance_alpha={vision.balance_alpha}: must be >= 0")
        weights = vision.balance_weights
        if weights is not None:
            weights = list(weights)
            if len(weights) != len(branches) or not math.isclose(sum(weights), len(branches), rel_tol=1e-6):
                raise FocusConfigError(
                    f"focus.vision.balance_weights={weights}: give one weight per branch "
                    f"({len(branches)}) summing to {len(branches)}"
                )
            if min(weights) < 0:
                raise FocusConfigError(f"focus.vision.balance_weights={weights}: weights must be >= 0")


def build_vision(focus: DictConfig, hidden_size: int, grid: int) -> VisionSampler | None:
    """The vision-guided sampler for ``focus=vision|both``."""
    if focus.kind not in ("vision", "both"):
        return None
    vision = focus.vision
    return VisionSampler(
        hidden_size,
        grid,
        window=int(vision.window),
        branches=OmegaConf.to_container(vision.branches),
        scaling=vision.scaling,
    )


def build_text(focus: DictConfig, depth: int) -> TextSampler | None:
    """The text-guided sampler for ``focus=text|both``."""
    if focus.kind not in ("text", "both"):
        return None
    text = focus.text
    return TextSampler(
        depth,
        layer=text.layer,
        gamma=text.gamma,
        layer_range=OmegaConf.to_container(text.layer_range) if text.layer_range is not None else None,
        gamma_range=OmegaConf.to_container(text.gamma_range) if text.gamma_range is not None else None,
        stochastic=text.stochastic,
    )


def build_focus_core(
    focus: DictConfig, llava: LlavaNextForConditionalGeneration, granularities: list[int]
) -> FocusCore:
    """``FocusCore`` over a built LLaVA-NeXT model."""
    vision_cfg = llava.config.vision_config
    grid = vision_cfg.image_size // vision_cfg.patch_size
    hidden = llava.config.text_config.hidden_size
    depth = len(llava.model.language_model.layers)
    weights = focus.vision.balance_weights if focus.kind in ("vision", "both") else None
    return FocusCore(
        llava,
        granularities,
        vision=build_vision(focus, hidden, grid),
        text=build_text(focus, depth),
        balance_alpha=float(focus.vision.balance_alpha) if focus.kind in ("vision", "both") else 0.0,
        balance_weights=list(weights) if weights is not None else None,
    )
