# Two commands do everything on a fresh machine:
#   make demo   train the offline tiny preset (CPU, about a minute)
#   make test   lint + the whole test suite
# A user's GPU box keeps its own CUDA torch: `install` adds torch only when none is importable.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
QLC    := $(VENV)/bin/qlc
# The CPU build the tests use. On a machine with no torch, PyPI's Linux wheel is the CUDA build
# (several GB of nvidia packages), so torch comes from PyTorch's CPU index, unless pip already has a
# torch wheel of its own in its find-links (CI's machines: a local 2.13.0+cpu, and no route to
# download.pytorch.org). A GPU box should install its own torch first.
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Three test workers on two cores: much of the suite waits on engine processes and timeouts (two
# workers kept the cores about 63% busy; on this project's 2-core machine the suite took 608 s with
# two and 534-560 s with three). Test files stay whole on one worker (--dist loadfile): their
# module fixtures train once.
TEST_WORKERS ?= 3

.PHONY: install demo test lint format bench-console faults clean

$(VENV)/.installed: pyproject.toml constraints/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || { \
	  if $(PY) -m pip install -q --dry-run --no-index --no-deps "$(TORCH_SPEC)" >/dev/null 2>&1; then \
	    $(PY) -m pip install -q "$(TORCH_SPEC)"; \
	  else \
	    $(PY) -m pip install -q "$(TORCH_SPEC)" --extra-index-url "$(TORCH_CPU_INDEX)"; \
	  fi; }
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
