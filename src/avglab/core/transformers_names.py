"""Names that transformers 5.x renamed, read off the installed version (``transformers>=5.0``).

The old names still work in 5.2x but warn on every call (``past_key_values`` -> ``cache`` in decoder
layers, models and ``create_causal_mask``; ``is_gradient_checkpointing`` ->
``is_activation_checkpointing``, ``gradient_checkpointing_enable`` -> ``activation_checkpointing_enable``),
so avglab asks for the name the installed version uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache as memoize

from torch import nn


@memoize
def cache_keyword(function: Callable) -> str:
    """``"cache"`` if ``function`` takes a parameter of that name, else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on for a transformers ``PreTrainedModel``."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def enable_checkpointing(model: nn.Module) -> None:
    """Turns on transformers' non-reentrant activation (gradient) checkpointing on every layer."""
    if hasattr(type(model), "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
