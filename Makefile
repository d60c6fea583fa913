# The README's two set-up commands are `make demo` and `make test`; both install everything first.
PYTHON    ?= /usr/bin/python3
VENV      ?= .venv
CACHE     ?= /var/cache/skyferry
CRIU_SRC  ?= $(CACHE)/criu-4.2.1
BIN        = $(VENV)/bin
STAMP      = $(VENV)/.installed
DASH_STAMP = $(VENV)/dashboard/.installed
SHELL      = /bin/bash
.SHELLFLAGS = -euo pipefail -c

.PHONY: host venv lock demo test lint unit bench bench-quick compat-zdtm compat-workloads clean

host:                      ## apt packages, CRIU 4.2, kernel knobs (idempotent, seconds when done)
	scripts/bootstrap-host.sh

$(STAMP): pyproject.toml requirements.lock scripts/install-venv.sh | host
	scripts/install-venv.sh $(PYTHON) $(VENV) $(CRIU_SRC)
	touch $@

$(DASH_STAMP): tests/dashboard/package.json tests/dashboard/package-lock.json scripts/install-dashboard-check.sh | host
	scripts/install-dashboard-check.sh $(VENV)/dashboard
	touch $@

venv: host $(STAMP) $(DASH_STAMP)

lock: venv                 ## re-resolve requirements.lock from pyproject.toml (on purpose; see README)
	$(BIN)/python scripts/lock.py

demo: venv                 ## bring up 3 local hosts, migrate a live TCP server, tear down
	$(BIN)/skyferry demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: venv lint            ## lint, then every test (slow suites included)
	$(BIN)/pytest -q 2>&1 | tee $(VENV)/test.log
	scripts/no-deprecations $(VENV)/test.log

unit: venv
	$(BIN)/pytest -q -m "not integration"

bench: venv
	$(BIN)/skyferry bench --out bench/out

bench-quick: venv
	$(BIN)/skyferry bench --quick --out bench/out

compat-zdtm: venv          ## CRIU's zdtm programs x engine x mode, migrated live; rewrites docs/compatibility.md
	$(BIN)/python -m skyferry.pipeline.scenarios.zdtm --all --out $(VENV)/zdtm-cells.json

compat-workloads: venv     ## real workloads (images from Debian's archive) x mode, moved live; rewrites docs/compatibility.md
	$(BIN)/python -m skyferry.pipeline.scenarios.workload_matrix --all --out $(VENV)/workload-cells.json

clean:
	rm -rf $(VENV) build dist *.egg-info
