# Two commands do all set-up: `make run` and `make test`. Both create or update the virtual environment in .venv.
#
# torch: these machines (and most laptops) want the CPU build; an unpinned `torch` would pull a multi-GB CUDA build.
# The setup therefore installs TORCH_SPEC only when .venv has no torch yet. GPU users: install your CUDA build of
# torch into .venv first (or pass TORCH_SPEC / TORCH_PIP_ARGS), and add the xformers extra with EXTRAS=test,cuda.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= test
ARGS ?=
# pytest-xdist workers: one per core on these 2-core machines; each worker uses one thread (tests/conftest.py)
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atelier-installed

.PHONY: run test test-long install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

run: $(STAMP)
	$(PY) launch.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=15 tests

# Effect tests too long for the suite's 15 minutes (Break-for-Make: about 22 minutes here); one process.
test-long: $(STAMP)
	ATELIER_LONG_TESTS=1 $(PY) -m pytest -q -s -m long tests

clean-venv:
	rm -rf $(VENV)
