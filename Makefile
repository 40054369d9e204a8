# avglab: `make test` and `make demo` create .venv and install what they need.
# TORCH_SPEC pins the CPU build of PyTorch that laptops and CI use; on a GPU machine run
# `make install TORCH_SPEC=torch` (or install your CUDA build first) to keep your own.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export AVGLAB_WORKSPACE ?= $(CURDIR)/workspace

.PHONY: install test test-slow lint demo tensorboard clean install-lmms test-lmms

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# One intra-op thread per process: the tests run many tiny ops and some spawn 2 processes, where
# torch's default threads per process oversubscribe a small machine (measured 4-30x slower).
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

# lmms-eval (`python -m lmms_eval --model avglab`) in its own venv, so that .venv stays as it is.
# One pip resolution of avglab[lmms] under a torch constraint: alone, `pip install lmms-eval` lets its
# torchvision pull a newer torch (a CUDA build) and does not see hydra-core's antlr4 pin. PyPI's torchvision
# is a CUDA build that cannot load next to the CPU torch; it is removed then (avglab's plugin, lmms-eval's
# CLI and its image tasks never import it; `pip check` then reports lmms-eval's unmet torchvision).
LMMS_VENV ?= .venv-lmms
LMMS_BIN := $(LMMS_VENV)/bin

install-lmms: $(LMMS_VENV)/.installed

$(LMMS_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_BIN)/pip install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(LMMS_VENV)/constraints.txt
	$(LMMS_BIN)/pip install -q -c $(LMMS_VENV)/constraints.txt -e ".[dev,lmms]"
	$(LMMS_BIN)/python -c "import torchvision" 2>/dev/null || $(LMMS_BIN)/pip uninstall -q -y torchvision
	touch $@

# The plugin's unit tests under the real lmms-eval base class, then the real CLI on a generated local task.
test-lmms: install-lmms
	OMP_NUM_THREADS=1 $(LMMS_BIN)/python -m pytest tests/eval/test_lmms_plugin.py tests/lmms

lint: install
	$(BIN)/ruff check src tests

# The whole AVG-LLaVA pipeline on the embedded default (tiny model, generated data).
demo: install
	$(BIN)/python -m avglab stage=pretrain
	$(BIN)/python -m avglab stage=instruct
	$(BIN)/python -m avglab stage=multigran
	$(BIN)/python -m avglab stage=rglf_cached
	$(BIN)/python -m avglab stage=eval

tensorboard: install
	$(BIN)/tensorboard --logdir $(AVGLAB_WORKSPACE)/runs

clean:
	rm -rf $(AVGLAB_WORKSPACE)
