"""``python -m avglab``: the Hydra app (config in the repository's conf/ folder)."""

from __future__ import annotations

import secrets
from datetime import datetime
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

# The repository's conf/ folder (avglab is installed editable from its checkout).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def run_id() -> str:
    """``<date>-<time>-<6 hex>``: sorts by start time, and two runs started in the same second differ."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# Run and sweep folders (conf/config.yaml) are named by it; cached, so a config resolves to one folder.
OmegaConf.register_new_resolver("avglab.run_id", run_id, use_cache=True, replace=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    """Composes the config (struct mode: unknown keys fail here) and runs one stage."""
    from avglab.run import run  # imported late so `--help` and config errors stay fast

    return run(cfg)
