# The whole set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format install lock clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/gcs-iap-proxy dev

lint: $(STAMP)
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix proxy tests
	$(BIN)/ruff format proxy tests

test: lint
	$(BIN)/python -m pytest

# The side-by-side benchmark (tests/bench.py; not part of `make test` or CI): the sidecar
# against nginx and against no proxy at all. Needs wrk, nginx and curl: installed from
# Debian when missing and apt-get is usable, else it stops and says what to install.
# The sidecar runs from $(RUNTIME): requirements.lock and the project, as the image installs
# them (the dev venv's extra packages would change its memory figures).
BENCH_TOOLS := wrk nginx curl
RUNTIME := .venv-runtime
bench: $(STAMP)
	@missing=""; for t in $(BENCH_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
			echo "bench: installing wrk nginx-light curl from Debian"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nginx-light curl >/dev/null \
			|| { echo "bench: apt-get install wrk nginx-light curl failed"; exit 1; }; \
		else \
			echo "bench: missing$$missing; install them (Debian: apt-get install wrk nginx-light curl)"; exit 1; \
		fi; \
	fi
	$(PYTHON) -m venv $(RUNTIME)
	$(RUNTIME)/bin/python -m pip install --quiet --require-hashes -r requirements.lock
	$(RUNTIME)/bin/python -m pip install --quiet --no-deps --force-reinstall .
	$(BIN)/python tests/bench.py --python $(RUNTIME)/bin/python $(BENCH_FLAGS)

# requirements.lock: the image's runtime dependencies (pyproject's [project] dependencies
# only), pinned with hashes for every platform's files. Run after changing those
# dependencies, with the Python of the Dockerfile's base image; PyPI only, so the lock
# names no machine-local index. Existing pins are kept; `make lock LOCK_FLAGS=--upgrade`
# moves every pin to the newest release.
lock: $(STAMP)
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile --quiet $(LOCK_FLAGS) \
		--generate-hashes --strip-extras --allow-unsafe --no-emit-index-url \
		--no-emit-find-links --output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) .venv-runtime .pytest_cache .mypy_cache .ruff_cache
