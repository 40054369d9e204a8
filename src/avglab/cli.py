"""``python -m avglab``: the Hydra app (config in the repository's conf/ folder)."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

# The repository's conf/ folder (avglab is installed editable from its checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    """Composes the config (struct mode: unknown keys fail here) and runs one stage."""
    from avglab.run import run  # imported late so `--help` and config errors stay fast

    return run(cfg)
