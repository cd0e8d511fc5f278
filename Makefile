# Two commands set everything up from a fresh clone:
#   make demo   the whole loop locally (testbed in 3 "clouds", xDS actor, real Envoy)
#   make test   fast tests, then slow ones (real Envoy, Prometheus, Ray, Chromium)
# Both create .venv, install the CPU build of torch first (an unpinned torch would pull
# a multi-GB CUDA build), then the package, then Prometheus, Redis (Ray's external GCS
# storage, for head fault tolerance) and Chromium (for the dashboard's browser test) via
# apt when they are missing.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup test test-fast test-slow fuzz demo bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml lab/pyproject.toml scripts/ensure-prometheus.sh scripts/ensure-redis.sh scripts/ensure-chromium.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet -e ./lab
	bash scripts/ensure-prometheus.sh
	bash scripts/ensure-redis.sh
	bash scripts/ensure-chromium.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

test-slow: setup
	$(PY) -m pytest -m slow

# `make test` (and CI) runs the property tests derandomised, the same examples every
# time; this searches afresh. Turn each find into a fixed example beside its test.
fuzz: setup
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -m "not slow"

# `make demo CLUSTERS=2` steers a second cluster (checkout) beside the first.
CLUSTERS ?= 1

demo: setup
	$(VENV)/bin/balanceiq demo --clusters $(CLUSTERS)

bench: setup
	$(VENV)/bin/balanceiq bench xds --json
	$(VENV)/bin/balanceiq bench xds --json --streams 1000 --endpoints 1000 --pushes 20
	$(VENV)/bin/balanceiq bench telemetry --json

# Formatting, lint, types and the import contracts (layers; the product never imports
# the lab). CI runs it before the tests.
lint: setup
	$(VENV)/bin/ruff format --check balanceiq lab tests
	$(VENV)/bin/ruff check balanceiq lab tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis artifacts *.egg-info
