# Set-up and entry points. Every target installs what it needs into .venv from the lock.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Airflow runs with its home inside the project, SQLite metadata, no examples.
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION := True
export GX_ANALYTICS_ENABLED := false
# Airflow's plugin loader builds pathspec's deprecated GitWildMatchPattern for every .airflowignore
# line: without this, every task log starts with that DeprecationWarning.
export PYTHONWARNINGS := ignore:GitWildMatchPattern:DeprecationWarning

.PHONY: help install demo test check up bench lint typecheck format soak lock clean screenshots chromium

help:
	@echo "make demo   - install, start the sandbox, run the sync end to end, print a summary"
	@echo "make test   - install and run the whole test suite"
	@echo "make check  - preflight: check the connections, accounts and settings a first run needs (CHECK_ARGS=--fix creates missing AC fields)"
	@echo "make up     - the sandbox plus 'airflow standalone' with the project's DAGs"
	@echo "make bench  - the benchmarks; writes docs/benchmarks.md"
	@echo "make lint   - ruff check and ruff format --check"
	@echo "make typecheck - mypy, strict, on include/, plugins/ and devtools/"
	@echo "make soak   - the reliability and security suites with larger batches and more kill points"
	@echo "make screenshots - optional: retake the UI screenshots in docs/img (installs Chromium if missing)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# Re-installs only when a requirements, lock or project file changed.
$(STAMP): $(VENV)/bin/python requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e . -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m devtools.demo

# Two workers, each taking whole test files (module fixtures stay in one process); every test
# gets its own ports, PostgreSQL database, Redis queue and staging folder.
TEST_WORKERS ?= 2
test: $(STAMP) chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

check: $(STAMP)
	$(PY) -m crm_sync check $(CHECK_ARGS)

soak: $(STAMP)
	CRM_SYNC_SOAK=1 $(PY) -m pytest -m "soak or not soak" tests/reliability tests/security

up: $(STAMP)
	$(PY) -m devtools.devserver

bench: $(STAMP)
	$(PY) -m bench

# The browser tests (tests/ui) and the screenshots drive a headless Chromium: installed with
# apt-get when missing on a Debian machine run as root.
chromium:
	@scripts/ensure_chromium.sh

screenshots: $(STAMP) chromium
	$(PY) scripts/screenshots.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerates constraints.txt from a clean resolve of the direct pins.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet -r requirements-dev.txt
	{ echo "# Full lock of every distribution installed by requirements-dev.txt, from a clean resolve."; \
	  echo "# Regenerate with: make lock"; .lock-venv/bin/pip freeze; } > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .airflow .airflow-demo .sandbox .staging
