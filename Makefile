# One entry point that sets itself up on a fresh machine.
#   make test   - create .venv, install torch and the project, run every test
#   make demo   - the tiny model streaming on CPU
#   make bench  - benchmarks (print tables; never pass/fail)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On the team's machines this version resolves to a local CPU wheel; on a machine
# with an NVIDIA GPU, PyPI's build of the same version is the CUDA one.
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-quick demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(PY) pyproject.toml
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=CUDA; else build=CPU; fi; \
		echo "installing the $$build build of torch $(TORCH_VERSION)"; \
		$(PY) -m pip install "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[engine,wan,video,virtualcam,dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m engine demo --model tiny --output out/demo.mp4

bench: setup
	$(PY) bench/dit.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
