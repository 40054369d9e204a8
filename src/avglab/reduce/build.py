"""``reduce=...`` (conf/reduce/) to a reduction object, resolved against the model's depth."""

from __future__ import annotations

from collections.abc import Mapping

from avglab.reduce.base import ReduceConfigError, Reduction, resolve_layer
from avglab.reduce.fastv import FastV
from avglab.reduce.prumerge_plus import PruMergePlus
from avglab.reduce.vtw import VTW

# each method's defaults (its paper's, and conf/reduce/<name>.yaml's): an entry of
# stage.compare_reduce may give only a name
DEFAULTS = {
    "none": {},
    "fastv": {"layer": 2, "keep": 0.5, "score": "mean"},
    "vtw": {"layer": 0.5},
    "prumerge_plus": {"keep": None, "neighbours": 32},
}


def build_reduction(spec, depth: int) -> Reduction | None:
    """The reduction a ``reduce`` config (or a ``stage.compare_reduce`` entry) names; None for ``none``.

    Args:
        spec: a name (``"fastv"``: its defaults) or a mapping with ``name`` and settings.
        depth: the LLM's number of layers (an int layer is absolute, a float a fraction of it).

    Raises:
        ReduceConfigError: an unknown name or key, or a value out of range.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ReduceConfigError(
            f"reduce: give a name ({', '.join(DEFAULTS)}) or a mapping with name, got {spec!r}"
        )
    name = spec["name"]
    if name not in DEFAULTS:
        raise ReduceConfigError(f"reduce.name={name!r}: one of {', '.join(DEFAULTS)}")
    unknown = set(spec) - set(DEFAULTS[name]) - {"name"}
    if unknown:
        raise ReduceConfigError(
            f"reduce={name}: unknown keys {sorted(unknown)} (it takes {sorted(DEFAULTS[name])})"
        )
    values = {**DEFAULTS[name], **{k: v for k, v in spec.items() if k != "name"}}
    if name == "none":
        return None
    if name == "fastv":
        layer = resolve_layer(values["layer"], depth, "reduce.layer", lowest=1)
        return FastV(layer, values["keep"], values["score"])
    if name == "vtw":
        return VTW(resolve_layer(values["layer"], depth, "reduce.layer"))
    return PruMergePlus(values["keep"], values["neighbours"])


def attach(core, spec) -> Reduction | None:
    """Builds ``spec`` for ``core``'s LLM and sets it as ``core.reduction``; returns it."""
    core.reduction = build_reduction(spec, core.config.text_config.num_hidden_layers)
    return core.reduction


def build_reductions(specs, depth: int) -> dict[str, Reduction | None]:
    """``stage.compare_reduce``'s entries by row label (``none`` for an entry naming no reduction).

    Raises:
        ReduceConfigError: as ``build_reduction``, or two entries with the same settings (one row each).
    """
    built: dict[str, Reduction | None] = {}
    for spec in specs or ():
        reduction = build_reduction(spec, depth)
        label = reduction.label if reduction is not None else "none"
        if label in built:
            raise ReduceConfigError(f"stage.compare_reduce: {label} is listed twice; give each setting once")
        built[label] = reduction
    return built
