# eventswarm — `make run` starts the daemon on config.example.toml, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
RUNTIME_STAMP := $(VENV)/.installed-runtime

.PHONY: install install-runtime engine images services run test unit integration lint bench gc clean cluster-down

# `make run` installs the daemon alone; the tests and tools (`make install`) add the dev extra.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/pip install -qq -e '.[dev]'
	touch $(STAMP)

# The warm functions' runner, a static binary (musl-tools from Debian).
RUNNER := dispatcher/executors/bin/eventswarm-runner
$(RUNNER): runner/eventswarm-runner.c scripts/runner.sh
	bash scripts/runner.sh

install: $(STAMP) $(RUNNER)

install-runtime: $(RUNTIME_STAMP) $(RUNNER)

# What `make run` needs, and no more: the Docker engine (a single-node Swarm manager, no default bridge) and the
# function images built from tests/images (the example's echo among them).
engine: install-runtime
	bash scripts/services.sh

images: engine
	bash scripts/images.sh

# What the tests need besides: a Kafka-protocol broker (tansu) on 127.0.0.1:19092, an Ethereum node (anvil) on 127.0.0.1:18545 and solc,
# Debian's chromium (the status page's tests drive it headless with playwright), and Debian's PostgreSQL on
# 127.0.0.1:15432 (the state store's contract suite runs on it as on SQLite), and npm's @octokit/webhooks-methods
# (GitHub's signing library: the webhook tests sign with each sender's own), and Debian's stunnel4 (a TLS front for
# the Kafka TLS tests) and logrotate, and a Swarm of three nodes (docker-in-docker, scripts/swarm-cluster.sh).
services: install images
	PYTHON=$(BIN)/python bash scripts/kafka.sh
	bash scripts/ethereum.sh
	bash scripts/browser.sh
	bash scripts/postgres.sh
	bash scripts/senders.sh
	bash scripts/tools.sh
	bash scripts/swarm-cluster.sh

run: images
	$(BIN)/eventswarm run -c config.example.toml

test: install services
	$(BIN)/pytest -q --durations=15 tests

unit: install
	$(BIN)/pytest -q tests/unit

integration: install services
	$(BIN)/pytest -q tests/integration

lint: install
	$(BIN)/ruff check dispatcher connectors tests bench
	$(BIN)/mypy dispatcher connectors
	$(BIN)/lint-imports

bench: install services
	$(BIN)/python bench/events.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/swarm.py
	$(BIN)/python bench/swarm_cluster.py
	$(BIN)/python bench/kafka.py
	$(BIN)/python bench/warm.py
	command -v wrk >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)
	$(BIN)/python bench/webhook.py

cluster-down:
	bash scripts/swarm-cluster.sh down

gc: install
	$(BIN)/eventswarm gc -c config.example.toml

clean:
	rm -rf $(VENV) $(RUNNER) eventswarm.db* eventswarm-inputs .pytest_cache .mypy_cache .ruff_cache
