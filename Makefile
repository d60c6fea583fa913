# The README's two set-up commands are `make demo` and `make test`; both install everything first.
PYTHON    ?= /usr/bin/python3
VENV      ?= .venv
CACHE     ?= /var/cache/skyferry
CRIU_SRC  ?= $(CACHE)/criu-4.2.1
BIN        = $(VENV)/bin
STAMP      = $(VENV)/.installed

.PHONY: host venv demo test lint unit bench bench-quick clean

host:                      ## apt packages, CRIU 4.2, kernel knobs (idempotent, seconds when done)
	scripts/bootstrap-host.sh

$(STAMP): pyproject.toml | host
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# pycriu comes from the same CRIU source tree as the criu binary; its build pins an ancient protobuf.
	$(BIN)/pip install -q "protobuf>=4.21,<6"
	$(BIN)/pip install -q --no-build-isolation $(CRIU_SRC)/lib
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

venv: host $(STAMP)

demo: venv                 ## bring up 3 local hosts, migrate a live TCP server, tear down
	$(BIN)/skyferry demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint            ## lint, then every test (slow suites included)
	$(BIN)/pytest -q

unit: venv
	$(BIN)/pytest -q -m "not integration"

bench: venv
	$(BIN)/skyferry bench --out bench/out

bench-quick: venv
	$(BIN)/skyferry bench --quick --out bench/out

clean:
	rm -rf $(VENV) build dist *.egg-info
