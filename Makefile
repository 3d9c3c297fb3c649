# Two commands do all the set-up: `make demo` and `make test` (see README.md).
# The virtual environment is created once and reused; it is reinstalled only when pyproject.toml changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdtfp-installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || { echo "Could not create $(VENV): on Debian/Ubuntu install python3.11-venv (apt-get install python3.11-venv)."; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kdtfp run all --quick

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check kdtfp tests examples
	$(VENV)/bin/ruff format --check kdtfp tests examples

bench: $(STAMP)
	$(VENV)/bin/kdtfp bench distiller --json saved_models/bench-distiller.json
	$(VENV)/bin/kdtfp bench sgld --json saved_models/bench-sgld.json
	$(VENV)/bin/kdtfp bench logz --json saved_models/bench-logz.json
	$(VENV)/bin/kdtfp bench online --json saved_models/bench-online.json
	$(VENV)/bin/kdtfp bench arhmm --json saved_models/bench-arhmm.json
	$(VENV)/bin/kdtfp bench recovery --json saved_models/bench-recovery.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
