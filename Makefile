# Two entry points on a fresh machine with Python 3.11 and pip: `make demo` and `make test`.
# TORCH pins the CPU wheel available here; on a GPU machine pass e.g. TORCH=torch==2.13.0 from the
# CUDA index, or TORCH= to keep the torch you have.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test docs lint format bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

demo: $(PY)
	$(PIP) $(TORCH) -e '.[examples]'
	$(PY) examples/fpdm/demo.py

test: $(PY)
	$(PIP) $(TORCH) -e '.[dev,examples]'
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

docs: $(PY)
	$(PIP) $(TORCH) -e '.[docs]'
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(PY)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(PY)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(PY)
	$(PIP) $(TORCH) -e '.[bench]'
	$(PY) benchmarks/solvers.py

clean:
	rm -rf $(VENV) build *.egg-info docs/_build
