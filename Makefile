# Everything installs from nothing: `make test` and `make figures` create .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Torch first, pinned to the releases this machine's pip serves from its local cache, so the
# environment is reproducible. The package itself has lower bounds only (pyproject.toml).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# The index torch and torchvision come from (empty: pip's default). For a CPU-only torch, where
# the index serves one (the default wheels carry about 4 GB of CUDA libraries):
#     make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
TORCH_CHOICE := $(VENV)/.torch-choice
# The recipes and figure scripts save figures without a display; library modules never choose.
export MPLBACKEND ?= Agg

.PHONY: install test test-slow figures figures-full bench bench-scale gpu-check docs report-screenshot clean FORCE

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

# Rewritten only when the torch choice changes; a change reinstalls torch in the existing .venv.
$(TORCH_CHOICE): FORCE | $(PY)
	@if [ "$$(cat $@ 2>/dev/null)" != "$(TORCH_PINS) index=$(TORCH_INDEX)" ]; then \
		if [ -f $@ ]; then $(PY) -m pip uninstall -y torch torchvision; fi; \
		echo "$(TORCH_PINS) index=$(TORCH_INDEX)" > $@; \
	fi

$(STAMP): $(PY) pyproject.toml $(TORCH_CHOICE)
	$(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PINS)
	$(PY) -m pip install -e '.[test,docs]'
	touch $(STAMP)

install: $(STAMP)

# Two pytest-xdist workers, whole files to one worker (a module's fixtures built once): the 3736 tests in
# 555 s on 2 idle cores (a clean clone, 2026-12-08 late; 537-600 s over that evening's three clean clones),
# the tests' CPU over two cores (the scale benchmark's smoke fixture, the DDP spawns and the example scripts' tests
# the heaviest), plus each worker's collection (about 27 s).
# TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

figures: $(STAMP)
	$(PY) -m recipes --quick

figures-full: $(STAMP)
	$(PY) -m recipes

# The committed figures/benchmark_kernels.{json,png} come from this command (about 25 minutes).
bench: $(STAMP)
	$(PY) -m recipes.benchmarks.kernels --cap 20

# figures/benchmark_scale.{json,png}: the cost estimate against measured memory on the CIFAR-sized
# UNet, the factored SGD tracker and the tiny-UNet analyzer against bare steps (about 5 minutes).
bench-scale: $(STAMP)
	$(PY) -m recipes.benchmarks.scale

# On a machine with a GPU: the prepared device check (CIFAR-sized UNet and 64x64 DCGAN tracked on
# CUDA, exactness, bit-for-bit training, memory and time per step) into figures/gpu_check.json.
gpu-check: $(STAMP)
	$(PY) -m recipes.benchmarks.gpu_check

# The mathematics (docs/*.md) rendered, links and docstring references checked, and the API
# reference from the docstrings (pdoc) into docs/_build/; any warning fails the build.
docs: $(STAMP)
	$(PY) docs/build.py

# figures/report_screenshot.png: the HTML report of a small real run (docs/examples/diffusion.py)
# rendered in headless Chromium (apt-get install chromium).
report-screenshot: $(STAMP)
	$(PY) -c "import sys; sys.path.insert(0, 'docs/examples'); import diffusion; \
	from genkernel.report.browser import inspect_page; run = diffusion.main('build/report-example'); \
	page = inspect_page(run['report'], screenshot='figures/report_screenshot.png'); \
	assert not page['broken'] and not page['errors'], page; print('wrote figures/report_screenshot.png')"

clean:
	rm -rf $(VENV) build *.egg-info docs/_build

FORCE:
