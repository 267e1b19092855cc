# `make demo` and `make test` each create or refresh .venv (idempotent: pip runs again only when pyproject.toml
# changes), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast slurm-up slurm-down clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	PY=$(PY) bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

clean:
	rm -rf runs/demo .pytest_cache
