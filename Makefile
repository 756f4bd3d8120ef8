# Herald: the two set-up commands are `make run` and `make test`.
# Both create .venv and install the project into it when needed.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Touched after a successful install; reinstall whenever pyproject.toml is newer.
STAMP := $(VENV)/.installed

# The test suite's services (same defaults as the tests themselves).
TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/herald_test
TEST_REDIS_URL ?= redis://127.0.0.1:6379/15
export TEST_DATABASE_URL TEST_REDIS_URL
PYTEST_ARGS ?=

# The embedded default (no REDIS_URL: kombu's filesystem broker, SQLite) runs exactly one
# worker process. With Redis, WORKER_CONCURRENCY defaults to 2.
ifeq ($(strip $(REDIS_URL)),)
ifneq ($(origin WORKER_CONCURRENCY),undefined)
ifneq ($(strip $(WORKER_CONCURRENCY)),1)
$(info note: WORKER_CONCURRENCY=$(WORKER_CONCURRENCY) ignored: the embedded default (no REDIS_URL) runs one worker)
endif
endif
override WORKER_CONCURRENCY := 1
else
WORKER_CONCURRENCY ?= 2
endif

.PHONY: help install run test lint migrate clean distclean

help:
	@echo "make run        create .venv, install, migrate, start api + worker + beat + flower (Ctrl-C stops all)"
	@echo "make test       create .venv, install, start PostgreSQL/Redis if needed, run pytest (PYTEST_ARGS=...)"
	@echo "make lint       ruff check ."
	@echo "make migrate    alembic upgrade head"
	@echo "make clean      remove var/ and caches (keeps .venv; 'make distclean' removes it too)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

install: $(STAMP)

# honcho reads no .env file here (--env /dev/null): the API, the workers, alembic and this
# Makefile all see the same configuration, the process environment.
run: install
	mkdir -p "$${HERALD_VAR_DIR:-var}"
	scripts/ensure_services.sh run
	$(BIN)/alembic upgrade head
	PATH="$(CURDIR)/$(BIN):$$PATH" WORKER_CONCURRENCY=$(WORKER_CONCURRENCY) \
		exec $(BIN)/honcho start -f Procfile --env /dev/null

test: install
	scripts/ensure_services.sh test
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

migrate: install
	mkdir -p "$${HERALD_VAR_DIR:-var}"
	scripts/ensure_services.sh run
	$(BIN)/alembic upgrade head

clean:
	rm -rf var .pytest_cache .ruff_cache .hypothesis build dist
	rm -f celerybeat-schedule*
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
