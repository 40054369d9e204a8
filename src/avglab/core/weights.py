"""Stage handoff weights: the core's state as safetensors (never pickle).

A stage's output folder holds ``core.safetensors``; LLaVA-NeXT keys live under ``llava.`` and the
selector's under ``selector.``. The next stage loads the LLaVA part strictly and the selector
only when the file has one of the same shape, so a router is initialised fresh after stage 3.
Under DDP, FSDP, FSDP2 or DeepSpeed the full state is gathered by every rank
(:func:`full_core_state`) and written by rank 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from avglab.core.model import AvgCore

log = logging.getLogger(__name__)
WEIGHTS = "core.safetensors"
EXTRA_WEIGHTS = "avglab.safetensors"  # an export's non-LLaVA weights (see avglab.tools.export)


def full_core_state(core: AvgCore, trainer=None) -> dict[str, torch.Tensor]:
    """The core's full, unsharded state on CPU; a collective: call it on every rank.

    Args:
        core: the core (inside the LightningModule the trainer fitted, attribute ``core``).
        trainer: the Lightning trainer, or None outside a distributed fit.

    Returns:
        ``core.state_dict()``'s keys with full CPU tensors (complete on rank 0).
    """
    if trainer is None or not torch.distributed.is_initialized():
        return {k: v.detach().contiguous().cpu() for k, v in core.state_dict().items()}
    strategy = trainer.strategy
    if type(strategy).__name__ == "DeepSpeedStrategy" and strategy.zero_stage_3:
        import deepspeed  # partitioned ZeRO-3 parameters are gathered for the copy only

        with deepspeed.zero.GatheredParameters(list(core.parameters()), modifier_rank=None):
            return {k: v.detach().contiguous().cpu().clone() for k, v in core.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # Works through DDP, FSDP (the root wraps the LightningModule) and FSDP2 (DTensor parameters).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(strategy.model, options=options)
    return {k[len("core.") :]: v.contiguous() for k, v in state.items() if k.startswith("core.")}


def save_core(
    core: AvgCore, folder: Path, meta: dict | None = None, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Writes the core's weights (and a small JSON of facts about them) to ``folder``.

    Args:
        core: the core.
        folder: output folder (created).
        meta: JSON-able facts written to ``meta.json``.
        state: a state already gathered by :func:`full_core_state` (else ``core.state_dict()``).
    """
    folder.mkdir(parents=True, exist_ok=True)
    state = state if state is not None else full_core_state(core)
    save_file(state, str(folder / WEIGHTS))
    (folder / "meta.json").write_text(json.dumps(meta or {}, indent=2, default=str))
    return folder


def load_core(core: AvgCore, folder: Path) -> dict[str, int]:
    """Loads weights saved by ``save_core`` into ``core``.

    Returns:
        Counts of loaded LLaVA and selector tensors.

    Raises:
        FileNotFoundError: no weights in ``folder``.
        ValueError: the LLaVA-NeXT part does not match the configured model.
    """
    path = Path(folder) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"no {WEIGHTS} in {folder}")
    state = load_file(str(path))
    llava = {k[len("llava.") :]: v for k, v in state.items() if k.startswith("llava.")}
    missing, unexpected = core.llava.load_state_dict(llava, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not fit model config: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; "
            "use the model=... that trained it"
        )
    loaded_selector = 0
    if core.selector is not None:
        own = core.selector.state_dict()
        theirs = {k[len("selector.") :]: v for k, v in state.items() if k.startswith("selector.")}
        if theirs and theirs.keys() == own.keys() and all(theirs[k].shape == own[k].shape for k in own):
            core.selector.load_state_dict(theirs)
            loaded_selector = len(theirs)
        elif own:
            log.info("selector initialised fresh (no matching selector weights in %s)", path)
    return {"llava": len(llava), "selector": loaded_selector}


def load_router(core: AvgCore, folder: Path) -> int:
    """Loads router (selector) weights strictly from a stage output or an export folder.

    Returns:
        The number of tensors loaded.

    Raises:
        FileNotFoundError: no weights file in ``folder``.
        ValueError: no trainable selector is configured, or the weights do not fit it.
    """
    folder = Path(folder)
    path = next((folder / n for n in (EXTRA_WEIGHTS, WEIGHTS) if (folder / n).exists()), None)
    if path is None:
        raise FileNotFoundError(f"model.router_from={folder}: no {EXTRA_WEIGHTS} or {WEIGHTS} there")
    own = core.selector.state_dict() if core.selector is not None else {}
    if not own:
        raise ValueError(f"model.router_from={folder}: router={core.selector!r} has no weights to load")
    theirs = {k[len("selector.") :]: v for k, v in load_file(str(path)).items() if k.startswith("selector.")}
    bad = sorted(k for k in own if k not in theirs or theirs[k].shape != own[k].shape)
    if bad or theirs.keys() != own.keys():
        raise ValueError(
            f"router weights in {path} do not fit the configured router (first mismatches: "
            f"{(bad or sorted(theirs.keys() ^ own.keys()))[:4]}); use the router.* settings that trained them"
        )
    core.selector.load_state_dict(theirs)
    return len(theirs)
