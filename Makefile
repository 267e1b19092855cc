# `make demo` and `make test` each create or refresh .venv (idempotent: pip runs again only when pyproject.toml
# changes), then run. `make setup` does only that.
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

# The Slurm tests run against a local cluster started here (a one-node partition and a two-node one: two slurmd in
# network namespaces), and the Fashion-MNIST loader test reads Debian's dataset-fashion-mnist installed here. Root +
# apt needed; without them those tests skip, or fail under CLUSTERLAB_REQUIRE_SLURM=1 / CLUSTERLAB_REQUIRE_DATA=1
# (.ci/run). The cluster script stops only what it started.
test: $(STAMP)
	@bash tests/install_fashion_mnist.sh || echo "no Fashion-MNIST: its loader test will skip"
	@bash tests/slurm/local_cluster.sh start || echo "the local Slurm cluster did not (fully) start: the Slurm tests that need it will skip"
	$(PY) -m pytest -q -n 2 tests; status=$$?; bash tests/slurm/local_cluster.sh stop; exit $$status

# The unit lane: every test that starts no process (tests/conftest.py marks the others `slow`), in under a minute.
test-fast: $(STAMP)
	CLUSTERLAB_FAST_LANE=1 $(PY) -m pytest -q -n 2 -m "not slow and not slurm" tests

# The local Slurm cluster the Slurm tests use (a one-node and a two-node partition), for trying things by hand.
slurm-up:
	bash tests/slurm/local_cluster.sh start

slurm-down:
	bash tests/slurm/local_cluster.sh stop

clean:
	rm -rf runs/demo .pytest_cache
