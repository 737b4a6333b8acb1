# llmroute: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit crds crds-check bench e2e setup system-deps clean

## Three sidecars sharing a private redis-server in front of a built-in mock OpenAI upstream, traffic
## driven through them (one sidecar on the memory store when redis-server cannot be installed).
demo: $(STAMP)
	@scripts/ensure-system-deps.sh || echo "llmroute: no redis-server; the demo runs one sidecar on the memory store"
	$(PY) -m llmroute_sidecar.demo

## Everything CI runs: set-up, lint, type checks and the whole test suite.
test: system-deps $(STAMP) lint typecheck unit

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { echo "llmroute: python3 -m venv failed; installing python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[operator,test,dev,bench]'
	@touch $(STAMP)

system-deps:
	@scripts/ensure-system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(VENV)/bin/pytest -q

## Regenerate the CRD (crds/ and the chart's copy) from the pydantic models.
crds: $(STAMP)
	$(PY) -m llmroute_operator.crd crds helm/llmroute/crds

crds-check: $(STAMP)
	$(PY) -m llmroute_operator.crd --check crds helm/llmroute/crds

## Benchmarks (wrk against direct, nginx, the floor and the sidecars; about 6 minutes on 2 cores, with the 70 s fleet run): report
## and PNGs to bench/results/ (untracked); `make bench UPDATE_DOCS=1` rewrites docs/benchmarks.md and
## docs/benchmarks/*.png; BENCH_ARGS passes more flags (e.g. BENCH_ARGS="--duration 10", see --help).
## Installs wrk (apt-get) and matplotlib (the venv's `bench` extra) when missing.
UPDATE_DOCS ?=
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed
bench: $(STAMP) $(BENCH_STAMP)
	@bench/ensure-wrk.sh
	$(PY) bench/run.py $(if $(UPDATE_DOCS),--update-docs) $(BENCH_ARGS)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[bench]'
	@touch $(BENCH_STAMP)

## The kind-based end-to-end suite (needs Docker and kind; skips with a reason otherwise).
e2e: $(STAMP)
	$(VENV)/bin/pytest -q e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
