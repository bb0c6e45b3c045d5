# One command runs the stack (make up), one runs the tests (make test); both install on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install up down status demo test test-unit bench bench-scale bench-users soak simulate fmt lint precommit clean system-deps

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

test: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

test-unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

# The benchmarks are scripts in benchmarks/ (not packaged); docs/performance.md keeps what each found.
bench: $(STAMP)
	$(PY) benchmarks/bench.py

# The window filled through the Bentos' writer at 1, 5 and 20 million rows (Postgres) and 1 and 5 million
# (SQLite): evaluation, API and scrape times, storage per hour. SIZES=pg:1e5 for a quick run.
bench-scale: $(STAMP)
	$(PY) benchmarks/bench_scale.py $(if $(SIZES),--sizes $(SIZES),)

# Traefik's CPU per request with and without the user-assignment plugin, side by side (docs/users.md).
bench-users: $(STAMP)
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

# System packages the integration tests use (Debian): compose validation, promtool, headless Chromium, wrk.
system-deps:
	@missing=""; \
	command -v docker-compose >/dev/null || missing="$$missing docker-compose"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
