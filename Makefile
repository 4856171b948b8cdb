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

.PHONY: help setup run test test-fast compile bench lint clean serve playground mlflow-ui submit schedule images system-deps

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (kubellm needs Python 3.11)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on a CPU machine.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,ray,eval]' torch==2.13.0
	@touch $@

setup: $(STAMP)  ## create .venv with kubellm and its dev tools

system-deps:  ## Debian packages the browser tests need (Chromium + ChromeDriver); no-op when present
	@bash .ci/system-deps.sh

run: $(STAMP)  ## run the main job on the embedded default (configs/local.yaml)
	$(BIN)/kubellm run --config $(CONFIG)

test: $(STAMP) system-deps  ## run the test suite (unit, pipeline, integration, browser)
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-fast: $(STAMP)  ## only the fast unit tests
	$(BIN)/python -m pytest -q -m "not slow and not integration and not browser and not gpu" $(PYTEST_ARGS)

compile: $(STAMP)  ## compile every pipeline and component to dist/ (deterministic)
	$(BIN)/kubellm compile --config $(CONFIG) --out dist

bench: $(STAMP)  ## benchmarks side by side against plain baselines (ratios, not absolute times)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

lint: $(STAMP)  ## ruff, yamllint, hadolint
	$(BIN)/ruff check src components pipelines tests benchmarks
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
