# avglab: `make test` and `make demo` create .venv and install what they need.
# TORCH_SPEC pins the CPU build of PyTorch that laptops and CI use; on a GPU machine run
# `make install TORCH_SPEC=torch` (or install your CUDA build first) to keep your own.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export AVGLAB_WORKSPACE ?= $(CURDIR)/workspace

.PHONY: install test test-slow lint demo tensorboard clean

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
