# The two quick-start commands are `make run` and `make test`; each sets up what it needs
# (virtual environment, Python packages, buf and grpc-js from npm) the first time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
NODE   := node_modules/.installed-$(shell cat package-lock.json | cksum | cut -d' ' -f1)

.PHONY: run test lint gen setup bench clean

# Metrics on at a fixed loopback address (printed at start); OPCONNECT_METRICS_LISTEN overrides.
run: $(STAMP)
	OPCONNECT_METRICS_LISTEN=$${OPCONNECT_METRICS_LISTEN-127.0.0.1:9464} $(BIN)/opconnect serve

# The suite runs on PYTEST_WORKERS processes (pytest-xdist; `auto`: one per core), each test
# module kept on one of them (`loadscope`: a module's shared fixtures are made once); 0: in this
# process alone.
PYTEST_WORKERS ?= auto

test: setup
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadscope $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app plumbing gateway services simulator operator_client opconnect_client examples tools tests bench
	node_modules/.bin/buf lint
	node_modules/.bin/buf format --diff --exit-code
	$(BIN)/python tools/gen_protos.py --check

gen: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# BENCH_DATABASE: a PostgreSQL URL to run them on (empty: SQLite).
BENCH_OPTS = $(if $(BENCH_DATABASE),--database $(BENCH_DATABASE))

bench: setup
	$(BIN)/python bench/numbers_bench.py $(BENCH_OPTS)
	$(BIN)/python bench/records_bench.py $(BENCH_OPTS)
	$(BIN)/python bench/usage_bench.py $(BENCH_OPTS)
	$(BIN)/python bench/log_lock_bench.py $(BENCH_OPTS)
	$(BIN)/python bench/fairness_bench.py $(BENCH_OPTS)
	$(BIN)/python bench/replicas_bench.py $(if $(BENCH_DATABASE),--database $(BENCH_DATABASE),--database postgresql+psycopg://postgres@127.0.0.1:5432/test)
	$(BIN)/python bench/sustained_bench.py $(BENCH_OPTS)

setup: $(STAMP) $(NODE)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

$(NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	rm -f node_modules/.installed-*
	touch $@

clean:
	rm -rf $(VENV) node_modules var .pytest_cache .hypothesis
