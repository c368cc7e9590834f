# Every target installs what it needs: a project virtualenv from the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run demo test lint typecheck proto proto-check bench soak audit migrate chaos chromium clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# The whole stack on its embedded defaults: embedded Postgres, ledger, local provider, gateway.
run: $(STAMP)
	$(PY) -m scripts.devstack

demo: $(STAMP)
	$(PY) -m scripts.demo

test: $(STAMP) proto-check lint chromium
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

proto: $(STAMP)
	$(PY) scripts/gen_protos.py

proto-check: $(STAMP)
	$(PY) scripts/gen_protos.py --check

# wrk (a C HTTP load generator, from Debian's packages) drives the HTTP edge's figures.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
bench: $(STAMP)
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -q wrk >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q wrk >/dev/null) \
		|| echo "wrk could not be installed: the HTTP edge figures will be skipped"
	$(PY) -m bench

# Headless Chromium and its driver (Debian's chromium, chromium-driver) for tests/browser, which
# skip, saying why, when they are still missing after this.
chromium:
	@(command -v chromium >/dev/null && command -v chromedriver >/dev/null) \
		|| $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null \
			&& $(SUDO) apt-get install -y -q chromium chromium-driver >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

# The whole stack under steady mixed load (metered calls, streams, BYOK, webhook purchases) for
# SOAK_SECONDS (default 600), sampled every SOAK_SAMPLE_SECONDS (60); fails on anything that grows.
soak: $(STAMP)
	@command -v redis-server >/dev/null || $(SUDO) apt-get install -y -q redis-server >/dev/null \
		|| ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q redis-server >/dev/null)
	$(PY) -m bench.soak

# The ledger's full chaos run (make test runs a short one): random operations from many workers
# while the ledger is SIGKILLed and restarted; CHAOS_SEED=<n> replays a run's operations.
CHAOS_OPS ?= 12000
CHAOS_KILLS ?= 8
chaos: $(STAMP)
	CHAOS_OPS=$(CHAOS_OPS) CHAOS_KILLS=$(CHAOS_KILLS) $(PY) -m pytest tests/chaos -q -s

migrate: $(STAMP)
	$(PY) -m ledger_service migrate

audit: $(STAMP)
	$(PY) -m ledger_service audit

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
