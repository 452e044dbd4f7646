# Two commands do everything on a fresh machine:
#   make demo   train the offline tiny preset (CPU, about a minute)
#   make test   lint + the whole test suite
# A user's GPU box keeps its own CUDA torch: `install` adds torch only when none is importable.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
QLC    := $(VENV)/bin/qlc
# The CPU build the tests use. On a machine with no torch, pip's default index would pull a CUDA
# build with several GB of dependencies; a GPU box should install its own torch first.
TORCH_SPEC ?= torch==2.13.0
# Two test workers: half the suite waits on engine processes and timeouts, so two workers fill two
# cores. Test files stay whole on one worker (--dist loadfile): their module fixtures train once.
TEST_WORKERS ?= 2

.PHONY: install demo test lint format bench-console faults clean

$(VENV)/.installed: pyproject.toml constraints/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]" -c constraints/test.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(QLC) train tiny-demo

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The 20-trial fault campaigns of docs/reliability.md (about half an hour on 2 cores; root also
# runs the real small-disk trials): writes bench/results/faults-<date>.json.
faults: install
	$(PY) -m bench.faults $(FAULTS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
