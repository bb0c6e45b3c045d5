# One command runs the stack (make up), one runs the tests (make test); both install on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install up down status demo test test-unit test-compose bench bench-scale bench-users soak simulate fmt lint precommit clean \
	system-deps need-wrk compose-images compose-up compose-down compose-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,k8s,load,bench]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/recsys up

down:
	@test -x $(BIN)/recsys && $(BIN)/recsys down || true

status: $(STAMP)
	$(BIN)/recsys status

demo: $(STAMP)
	$(BIN)/recsys demo

# Every tier but the compose tier first, then the compose tier (tests/compose: the images built here, a
# whole stack in Docker), each with the machine to itself, since both hold timing-sensitive checks; both
# run whatever the other's result. docs/containers.md has the compose tier's timings.
test: system-deps $(STAMP)
	@$(BIN)/pytest -q -p no:cacheprovider --durations=15 --ignore=tests/compose; status=$$?; \
	echo "--- compose tier (tests/compose) ---"; \
	$(BIN)/pytest -q -p no:cacheprovider --durations=5 tests/compose; compose_status=$$?; \
	[ $$status = 0 ] && [ $$compose_status = 0 ]

test-compose: system-deps $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=5 tests/compose

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The benchmarks are scripts in benchmarks/ (not packaged); docs/performance.md keeps what each found.
bench: $(STAMP) need-wrk
	$(PY) benchmarks/bench.py

# The window filled through the Bentos' writer at 1, 5 and 20 million rows (Postgres) and 1 and 5 million
# (SQLite): evaluation, API and scrape times, storage per hour. SIZES=pg:1e5 for a quick run.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py $(if $(SIZES),--sizes $(SIZES),)

# Traefik's CPU per request with and without the user-assignment plugin, side by side (docs/users.md).
bench-users: $(STAMP) need-wrk
	PYTHONPATH=. $(PY) benchmarks/bench_user_assignment.py

soak: $(STAMP)
	$(PY) -m load.soak

simulate: $(STAMP)
	$(BIN)/recsys simulate

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

precommit: $(STAMP)
	$(BIN)/pre-commit run --all-files

clean: down
	rm -rf .recsys sim-results bench-results

# System packages the tests use (Debian): Docker and docker-compose (the compose tier), debootstrap (its
# base image), promtool, headless Chromium, wrk. Installed with apt when run as root; otherwise the
# missing ones are named and the target fails. Starts dockerd when Docker is installed but not running.
SYSTEM_DEPS := docker:docker.io dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap \
	promtool:prometheus chromium:chromium wrk:wrk
system-deps:
	@missing=""; \
	for pair in $(SYSTEM_DEPS); do \
	  command -v "$${pair%%:*}" >/dev/null || [ -x "/usr/sbin/$${pair%%:*}" ] || \
	    case " $$missing " in *" $${pair#*:} "*) ;; *) missing="$$missing $${pair#*:}";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "The tests need these Debian packages:$$missing (as root: apt-get install$$missing)" >&2; exit 1; \
	  fi; \
	fi
	@if ! /usr/bin/docker version >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "starting dockerd (log: /var/log/dockerd.log)"; \
	    setsid dockerd >/var/log/dockerd.log 2>&1 < /dev/null & \
	    for i in $$(seq 60); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 1; done; \
	  fi; \
	  /usr/bin/docker version >/dev/null 2>&1 || { echo "The Docker engine does not answer (start dockerd as root)" >&2; exit 1; }; \
	fi

# The benchmarks' load generator alone (make system-deps installs it with the rest).
need-wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing: wrk"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; \
	  else echo "The benchmarks need wrk (as root: apt-get install wrk)" >&2; exit 1; fi; }

# The production shape in containers (docker-compose.yml). RECSYS_IMAGES=local builds every image here
# from Debian's packages and PyPI; RECSYS_IMAGES=official uses the official images (pulled). The secrets
# (passwords, tokens) are created once in COMPOSE_SECRETS and passed with --env-file.
RECSYS_IMAGES ?= local
COMPOSE_PROJECT_NAME ?= recsys
COMPOSE_SECRETS ?= .recsys/compose.env
COMPOSE_FILES := docker-compose.yml$(if $(filter local,$(RECSYS_IMAGES)),:infra/docker/compose.local.yml)
DOCKER_GID ?= $(shell stat -c %g /var/run/docker.sock 2>/dev/null || echo 0)
COMPOSE := COMPOSE_FILE=$(COMPOSE_FILES) COMPOSE_PROJECT_NAME=$(COMPOSE_PROJECT_NAME) DOCKER_GID=$(DOCKER_GID) \
	docker-compose --env-file $(COMPOSE_SECRETS)
GATEWAY := http://127.0.0.1:$${RECSYS_GATEWAY_PORT:-8080}

compose-images:
	RECSYS_IMAGES=$(RECSYS_IMAGES) infra/docker/build-images.sh

$(COMPOSE_SECRETS):
	infra/docker/compose-secrets.sh $(COMPOSE_SECRETS)

compose-up: compose-images $(COMPOSE_SECRETS)
	@t0=$$(date +%s); \
	$(COMPOSE) up -d && \
	python3 infra/docker/wait_gateway.py "$(GATEWAY)" 600 && \
	echo "compose stack up in $$(( $$(date +%s) - t0 )) s: gateway $(GATEWAY), control plane http://127.0.0.1:$${RECSYS_CONTROL_PLANE_PORT:-8090}/"

# KEEP_DATA=1 keeps the volumes (Postgres, MLflow, Redis, Prometheus, state) and the Bento images for
# the next compose-up.
compose-down: $(COMPOSE_SECRETS)
	$(COMPOSE) down --remove-orphans $(if $(KEEP_DATA),,--volumes) --timeout 20
	$(if $(KEEP_DATA),,infra/docker/remove-bento-images.sh $(COMPOSE_PROJECT_NAME))

# `make demo` against the compose stack: the story runs in a container on the stack's network.
compose-demo: $(COMPOSE_SECRETS)
	$(COMPOSE) run --rm --no-deps seed recsys demo
