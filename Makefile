# Everything installs from nothing: `make test` and `make figures` create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Torch first, pinned to the releases this machine's pip serves from its local cache.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-slow figures figures-full bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

figures: $(STAMP)
	$(PY) -m recipes --quick

figures-full: $(STAMP)
	$(PY) -m recipes

# The committed figures/benchmark_kernels.{json,png} come from this command (about 30 minutes).
bench: $(STAMP)
	$(PY) -m recipes.benchmarks.kernels --cap 20

clean:
	rm -rf $(VENV) build *.egg-info
