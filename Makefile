# Two entry points on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# `make rehearsal` runs the FPDM example's at-scale path (extract, train, sample, evaluate) at small size
# on the CPU, 2 processes per stage, and checks what each stage wrote (a few minutes).
# TORCH pins the CPU wheel available here; on a GPU machine pass e.g. TORCH=torch==2.13.0 from the
# CUDA index, or TORCH= to keep the torch you have.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# pytest-xdist workers for `make test` and `make test-floor`: auto is one per core; each test file runs whole
# on one worker (its module fixtures built once). JOBS=0 runs every test in pytest's own process.
JOBS ?= auto
PYTEST_JOBS := -n $(JOBS) --dist loadfile

# The oldest supported torch and Python (pyproject: torch>=2.4, requires-python>=3.10). `make test-floor`
# runs the library's tests (tests/ without the FPDM example's tests/fpdm/) there. torch 2.4.1 comes from
# PyPI only as a CUDA build (about 2.5 GB with its nvidia-* packages; it runs on the CPU), so the venv lives
# outside the tree and is reused while its Python matches: pip then installs nothing new for torch.
FLOOR_TORCH ?= torch==2.4.1
FLOOR_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) python3.10)
FLOOR_VENV ?= $(HOME)/.cache/implicitdiff/venv-floor
FLOOR_PY := $(FLOOR_VENV)/bin/python

.PHONY: demo test rehearsal test-floor typecheck package-check docs lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

demo: $(PY)
	$(PIP) $(TORCH) -e '.[examples]'
	$(PY) examples/fpdm/demo.py

test: $(PY)
	$(PIP) $(TORCH) -e '.[dev,examples]'
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q $(PYTEST_JOBS)

rehearsal: $(PY)
	$(PIP) $(TORCH) -e '.[examples,latents]'
	$(PY) examples/fpdm/rehearsal.py

test-floor:
	@want=$$($(FLOOR_PYTHON) -c 'import sys; print(sys.version_info[:2])') || { \
		echo "make test-floor: no $(FLOOR_PYTHON); pass FLOOR_PYTHON=<a Python 3.10>" >&2; exit 1; }; \
	have=$$($(FLOOR_PY) -c 'import sys; print(sys.version_info[:2])' 2>/dev/null || true); \
	if [ "$$have" != "$$want" ]; then rm -rf $(FLOOR_VENV) && $(FLOOR_PYTHON) -m venv $(FLOOR_VENV); fi
	$(FLOOR_PY) -m pip install --quiet --disable-pip-version-check $(FLOOR_TORCH) -e '.[dev]'
	$(FLOOR_PY) -c 'import sys, torch, numpy; print("floor: Python", sys.version.split()[0], "torch", torch.__version__, "numpy", numpy.__version__)'
	$(FLOOR_PY) -m pytest -q -p no:cacheprovider --ignore=tests/fpdm $(PYTEST_JOBS)

typecheck: $(PY)
	$(PIP) $(TORCH) -e '.[dev]'
	$(PY) -m mypy

# Builds the sdist and the wheel, checks them, installs the wheel into a fresh venv outside the tree and
# runs the README's quickstart and the doctests there (see .ci/package-check).
package-check: $(PY)
	$(PIP) $(TORCH) -e '.[dev]'
	bash .ci/package-check $(PY) $(or $(TORCH),torch)

docs: $(PY)
	$(PIP) $(TORCH) -e '.[docs]'
	$(PY) -m sphinx -n -W --keep-going -b html docs docs/_build/html

lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(PY)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(PY)
	$(PIP) $(TORCH) -e '.[bench]'
	$(PY) -m benchmarks.solvers

clean:
	rm -rf $(VENV) build dist *.egg-info docs/_build
