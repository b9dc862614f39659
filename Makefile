# The project's commands for those who type make; each target is `python3 dev.py <target>`,
# which does the work on every OS (Windows: `py dev.py <target>`; `python3 dev.py help`).
#   make demo        - set up if needed, then the demo (the tiny model on a machine without CUDA)
#   make test        - set up if needed (.venv, torch, the project), then every test
#   make test-quick  - the tests not marked slow
#   make bench       - benchmarks (print tables; never pass/fail)
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup test test-quick demo bench clean

setup demo bench clean:
	$(PYTHON) dev.py $@

test test-quick:
	$(PYTHON) dev.py $@ $(PYTEST_ARGS)
