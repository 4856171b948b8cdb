# kubellm — every target that needs Python creates and fills .venv on first use.
# The two commands a fresh machine needs: `make run` and `make test`.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/local.yaml
# Filled again whenever pyproject.toml changes.
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= true
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: help setup run test test-fast compile docs bench lint clean serve playground mlflow-ui submit schedule images system-deps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

SETUP_LOG := $(VENV)/setup.log
EXTRAS := [dev,ray,eval]
UV_REQ := uv>=0.9,<1
# $(call quietly,WHAT,COMMAND): one line of progress; pip's and setuptools' output goes to SETUP_LOG,
# whose tail (and name) is printed when the step fails.
quietly = printf '  %s\n' "$(1)"; $(2) >>$(SETUP_LOG) 2>&1 || { echo "error: $(1) failed (full log: $(SETUP_LOG)):" >&2; tail -n 15 $(SETUP_LOG) >&2; exit 1; }

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (kubellm needs Python 3.11)" >&2; exit 1; }
	@echo "setting up $(VENV) (kubellm and its pinned stack; a few minutes the first time)"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@: > $(SETUP_LOG)
	@# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	@$(call quietly,torch 2.13 (CPU),$(BIN)/python -m pip install torch==2.13.0)
	@# The rest with uv (same resolution as pip, ~10x faster: ~1 min instead of ~5 on 2 cores); bytecode
	@# compiled at install, since PYTHONDONTWRITEBYTECODE would otherwise recompile every import every time.
	@$(call quietly,uv (the installer),$(BIN)/python -m pip install '$(UV_REQ)')
	@$(call quietly,kubellm with its dev/ray/eval extras (editable),$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode -e '.$(EXTRAS)' torch==2.13.0)
	@touch $@
	@echo "  done: $(VENV) is ready"

setup: $(STAMP)  ## create .venv with kubellm and its dev tools

system-deps:  ## Debian packages the browser tests need (Chromium + ChromeDriver); no-op when present
	@bash .ci/system-deps.sh

run: $(STAMP)  ## run the main job on the embedded default (configs/local.yaml)
	$(BIN)/kubellm run --config $(CONFIG)

# Both cores: pytest-xdist, a module's tests on one worker (its module fixtures built once), serial tests
# alone (tests/conftest.py). --durations shows the slowest tests on every run.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

test: $(STAMP) system-deps  ## run the whole test suite (unit, pipeline, integration, browser) on both cores
	$(PYTEST) -m "not gpu" --durations=15 $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the inner loop: everything but pipeline runs, servers, browsers, Ray and PostgreSQL
	$(PYTEST) -m "not slow and not integration and not browser and not gpu and not serial" --durations=5 $(PYTEST_ARGS)

compile: $(STAMP)  ## compile every pipeline and component to dist/ (deterministic)
	$(BIN)/kubellm compile --config $(CONFIG) --out dist

docs: $(STAMP)  ## regenerate docs/config.md and docs/components.md from the config models and components
	@$(BIN)/kubellm config --markdown > docs/config.md && echo "wrote docs/config.md"
	@$(BIN)/python -m kubellm.pipelines.reference .

bench: $(STAMP)  ## benchmarks side by side against plain baselines (ratios, not absolute times)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)  ## ruff (lint and formatting, 120 columns), yamllint, hadolint
	$(BIN)/ruff check src components pipelines tests benchmarks examples
	$(BIN)/ruff format --check src components pipelines tests benchmarks examples
	$(BIN)/yamllint -c .yamllint.yaml configs
	$(BIN)/hadolint $$(find images -name Dockerfile -o -name '*.Dockerfile')

serve: $(STAMP)  ## serve the current champion on 127.0.0.1
	$(BIN)/kubellm serve --config $(CONFIG)

playground: $(STAMP)  ## the prompt playground on 127.0.0.1 against the local predictor
	$(BIN)/kubellm playground --config $(CONFIG)

mlflow-ui: $(STAMP)  ## open the local MLflow store in the MLflow UI (127.0.0.1:5000)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/.kubellm/mlflow.db --host 127.0.0.1 --port 5000

submit: $(STAMP)  ## upload the compiled pipeline and start a run (KFP_HOST, KFP token)
	$(BIN)/kubellm submit --config $(CONFIG) $(SUBMIT_ARGS)

schedule: $(STAMP)  ## create or update the recurring run (CRON in KFP's 6-field format)
	$(BIN)/kubellm schedule --config $(CONFIG) --cron "$(or $(CRON),0 0 3 * * *)" $(SCHEDULE_ARGS)

images:  ## build and push the runtime images (IMAGE_REGISTRY, IMAGE_TAG); needs a Docker engine
	@bash images/build.sh

clean:  ## remove local outputs, compiled pipelines and caches (keeps .venv)
	rm -rf .kubellm dist build src/*.egg-info .pytest_cache .ruff_cache
