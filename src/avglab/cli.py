"""``python -m avglab``: the Hydra app (config in the repository's conf/ folder)."""

from __future__ import annotations

import logging
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


# Library log records we cannot fix at the source, dropped by exact start of message (nothing else is hidden):
# Lightning advertises a logging service on every Trainer whose loggers are not its own.
DROPPED_LOG_MESSAGES = ("💡 Tip: For seamless cloud logging and experiment tracking",)


class DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        """False (drop) for a record whose message starts with a dropped prefix."""
        return not str(record.msg).startswith(self.prefixes)


def one_line_per_log_record() -> None:
    """Every log record printed once, through Hydra's handlers (console and the run's log file).

    Lightning puts a console handler of its own on the ``lightning`` logger and still propagates to
    the root logger, where Hydra's handler prints the same record again.
    """
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)
    drop = DropMessages(DROPPED_LOG_MESSAGES)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(drop)  # a filter applies where the record is made


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    """Composes the config (struct mode: unknown keys fail here) and runs one stage."""
    from avglab.run import run  # imported late so `--help` and config errors stay fast

    one_line_per_log_record()  # after the import: Lightning adds its handler when it is imported
    return run(cfg)
