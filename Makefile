# The whole set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format install lock clean

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
