"""Stage handoff weights: the core's state as safetensors (never pickle).

A stage's output folder holds ``core.safetensors``; LLaVA-NeXT keys live under ``llava.`` and the
selector's under ``selector.``. The next stage loads the LLaVA part strictly and the selector
only when the file has one of the same shape, so a router is initialised fresh after stage 3.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors.torch import load_file, save_file

from avglab.model.core import AvgCore

log = logging.getLogger(__name__)
WEIGHTS = "core.safetensors"


def save_core(core: AvgCore, folder: Path, meta: dict | None = None) -> Path:
    """Writes the core's weights (and a small JSON of facts about them) to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in core.state_dict().items()}
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
