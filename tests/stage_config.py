"""Hydra composition of the project config for the tests (importable: ``from stage_config import ...``).

``tests/`` is on ``sys.path`` under pytest's default (prepend) import mode because ``tests/conftest.py``
lives there, and for a test file of ``tests/`` started as a script (its own folder comes first).
"""

from pathlib import Path

from hydra import compose, initialize_config_dir

from avglab.cli import CONFIG_DIR


def compose_config(*overrides: str, hydra: bool = False):
    """``conf/config.yaml`` with ``overrides`` (and the ``hydra`` node if asked)."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def compose_run(workspace: Path, run_dir: Path | str, *overrides: str, hydra: bool = False):
    """The config of one run: ``workspace=``, ``run_dir=``, then ``overrides``."""
    return compose_config(f"workspace={workspace}", f"run_dir={run_dir}", *overrides, hydra=hydra)


def compose_stage(workspace: Path, stage: str, *overrides: str, tag: str = "", name: str | None = None):
    """``stage=<stage>`` in ``workspace``, run in ``<workspace>/runs/<name>``, ``<stage><tag>`` by default."""
    run_dir = f"{workspace}/runs/{name if name is not None else stage + tag}"
    return compose_config(f"stage={stage}", f"workspace={workspace}", f"run_dir={run_dir}", *overrides)


# a generated set small enough for a run in seconds: 40 training, 8 validation, 6 test samples, batches of 4
SMALL_SYNTH = [
    "data.synth.n_train=40",
    "data.synth.n_val=8",
    "data.synth.n_test=6",
    "data.batch_size=4",
    "data.eval_batch_size=4",
]
