# calstream: `make demo` runs the main job, `make test` runs the test suite.
# Both create .venv at the repository root on first use (Python >= 3.11 required).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.calstream-installed

.PHONY: demo test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,parity]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/calstream demo --workdir demo-output

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not parity and not slow"

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf demo-output .pytest_cache
