# digitune: `make tune` runs a study, `make test` runs the tests. Each sets itself up.
# Every target is a thin call of the `digitune` command, so everything works without make.

.DEFAULT_GOAL := help
.PHONY: help install install-dev gpu-wheels gpu-check doctor register init data tune worker mlflow-server report pareto select dashboard promote ensemble tflite rollback models gc serve bench bench-serve ui test test-fast lint docs clean

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STUDY ?= studies/mnist-cnn.toml
TRIALS ?=
TIMEOUT ?=
STORAGE ?=
WORKERS ?=
BACKEND_STORE ?=
MARGIN ?= 0
PORT ?= 8000
FORCE ?=
ENGINE ?= optuna
ALGORITHM ?= hyperband
BUDGET ?= 10
SEEDS ?= 3
REFIT ?=
TOP ?= 5
GREEDY ?=
VERSION ?=
KEEP ?= 5
# A registered model other than mnist-cnn: a study's [registry] model_name, as `make tune` printed.
MODEL ?=
DRY_RUN ?=
# `make select`'s limits on the chosen model, and where `make dashboard` listens.
MAX_PARAMS ?=
MAX_KB ?=
MAX_LATENCY_MS ?=
DASHBOARD_PORT ?= 8080
# `make mlflow-server AUTH=1`: every client signs in (MLFLOW_AUTH_ADMIN_PASSWORD on the first start).
AUTH ?=
# Where `make mlflow-server` listens (every interface: workers on other machines reach it) and
# keeps artifacts (ARTIFACTS=s3://bucket/path; default mlruns/artifacts).
HOST ?= 0.0.0.0
ARTIFACTS ?=

# URLs that may hold a password reach digitune and MLflow through the environment, unexpanded:
# never in a command line that make echoes or `ps` shows, and `$` or `&` in a password work.
ifneq ($(value STORAGE),)
export DIGITUNE_STORAGE := $(value STORAGE)
endif
ifneq ($(value BACKEND_STORE),)
export MLFLOW_BACKEND_STORE_URI := $(value BACKEND_STORE)
endif

MODEL_ARG = $(if $(MODEL),--model $(MODEL))
TUNE_ARGS := --study $(STUDY) $(if $(TRIALS),--trials $(TRIALS)) \
	$(if $(TIMEOUT),--timeout-minutes $(TIMEOUT)) \
	$(if $(WORKERS),--workers $(WORKERS)) $(if $(REFIT),--refit) $(if $(filter keras-tuner,$(ENGINE)),--engine keras-tuner --algorithm $(ALGORITHM))

help: ## Show this help
	@echo "Usage: make <target> [STUDY=studies/quick.toml] [TRIALS=N] [TIMEOUT=minutes] [STORAGE=url]"
	@echo
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  %-14s %s\n", $$1, $$2}'

# Running digitune installs what running needs; the tests add the development tools.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[all]'
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install --quiet -e '.[all,dev]'
	@touch $@

install: $(VENV)/.installed ## Create .venv and install digitune with all its extras

install-dev: $(VENV)/.installed-dev ## ... and the development tools (pytest, ruff, selenium, ...)

init: install ## Copy the study files shipped with digitune into studies/ (keeps existing ones)
	$(BIN)/digitune init

data: install ## Fetch and verify MNIST into data/mnist (or check MNIST_DIR); STUDY=... its [data]
	$(BIN)/digitune data $(if $(filter-out $(origin STUDY),file),--study $(STUDY))

tune: install ## Run or resume a study (STUDY TRIALS TIMEOUT STORAGE WORKERS REFIT=1 ENGINE=keras-tuner)
	$(BIN)/digitune tune $(TUNE_ARGS)

worker: install ## A worker on a study shared by every machine (STORAGE=...), in any order; `make register` after
	$(BIN)/digitune tune $(TUNE_ARGS) --no-register

mlflow-server: install ## MLflow tracking server on HOST:5000 for every machine (BACKEND_STORE, ARTIFACTS, AUTH=1)
	$(BIN)/digitune mlflow-server --host $(HOST) $(if $(ARTIFACTS),--artifacts-destination $(ARTIFACTS)) $(if $(AUTH),--auth)

report: install ## Summarise a study and log its figures to MLflow (STUDY, STORAGE)
	$(BIN)/digitune report --study $(STUDY)

promote: install ## Make @challenger @champion if better on the test set (MARGIN, FORCE=1, MODEL)
	$(BIN)/digitune promote --margin $(MARGIN) $(if $(FORCE),--force) $(MODEL_ARG)

ensemble: install ## Register the average of the study's TOP best trials (STUDY, TOP=5, GREEDY=1)
	$(BIN)/digitune ensemble --study $(STUDY) --top $(TOP) $(if $(GREEDY),--greedy) $(MODEL_ARG)

pareto: install ## Print a study's Pareto front: accuracy, parameters, int8 KB, latency (STUDY)
	$(BIN)/digitune pareto --study $(STUDY)

select: install ## Register the best Pareto model within MAX_PARAMS/MAX_KB/MAX_LATENCY_MS (STUDY)
	$(BIN)/digitune select --study $(STUDY) $(if $(MAX_PARAMS),--max-params $(MAX_PARAMS)) \
		$(if $(MAX_KB),--max-kb $(MAX_KB)) $(if $(MAX_LATENCY_MS),--max-latency-ms $(MAX_LATENCY_MS))

dashboard: install ## optuna-dashboard on the study's storage, live (STUDY, STORAGE, DASHBOARD_PORT)
	$(BIN)/digitune dashboard --study $(STUDY) --port $(DASHBOARD_PORT)

tflite: install ## TFLite float16/int8 files of @champion (or VERSION=N), logged to its run (MODEL)
	$(BIN)/digitune export $(if $(VERSION),--version $(VERSION)) $(MODEL_ARG)

rollback: install ## Move @champion back to the previous champion (MODEL)
	$(BIN)/digitune rollback $(MODEL_ARG)

models: install ## List the registered versions of mnist-cnn (or MODEL) with their aliases
	$(BIN)/digitune models $(MODEL_ARG)

gc: install ## Free disk: artifacts of trials outside each study's KEEP=5 best (DRY_RUN=1 to look first)
	$(BIN)/digitune gc --keep $(KEEP) $(if $(DRY_RUN),--dry-run)

serve: install ## Serve @champion (of MODEL): API and page on http://127.0.0.1:$(PORT)
	$(BIN)/digitune serve --port $(PORT) $(MODEL_ARG)

bench: install ## Throughput, tuning race, ablation, one worker vs two, own pictures vs a hand-written CNN (BUDGET, SEEDS)
	$(BIN)/digitune bench --budget-minutes $(BUDGET) --seeds $(SEEDS)

bench-serve: install ## Latency of single and batched requests to a running `make serve`
	$(BIN)/digitune bench-serve --url http://127.0.0.1:$(PORT)

ui: install ## Start the MLflow UI on 127.0.0.1:5000 to compare trials
	$(BIN)/digitune ui

doctor: install ## Say what a study would run on: backend, devices, precision, workers (STUDY)
	$(BIN)/digitune doctor --study $(STUDY)

register: install ## Test and register a study's best trial, tuned elsewhere (STUDY, or BUNDLE=dir)
	$(BIN)/digitune register $(if $(BUNDLE),--bundle $(BUNDLE),--study $(STUDY)) $(MODEL_ARG)

gpu-wheels: ## Fetch the wheels a GPU machine without digitune's packages needs (gpu/wheels.txt)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl -r gpu/wheels.txt
	mkdir -p .gpu/mnist && cp $(or $(MNIST_DIR),data/mnist)/*-ubyte.gz .gpu/mnist/

gpu-check: ## On a GPU: throughput at 3 batch sizes and the default study for 4 minutes (gpu/check.sh)
	bash gpu/check.sh $(if $(CPU),--cpu)

# The JAX pass runs beside the TensorFlow pass, in one process of its own: the two keep both
# cores busy to the end, where one after the other left one idle. Its report follows.
test: install-dev ## Run the tests (no network needed): on TensorFlow, and the JAX pass without it
	@echo "the JAX pass (KERAS_BACKEND=jax, TensorFlow blocked) runs beside; its report follows"
	@jax_log=$$(mktemp); \
	KERAS_BACKEND=jax PYTHONPATH=$(CURDIR)/tests/without_tensorflow \
		$(BIN)/pytest -m jax -n 1 >$$jax_log 2>&1 & jax=$$!; \
	$(BIN)/pytest; tensorflow_status=$$?; \
	wait $$jax; jax_status=$$?; \
	echo; echo "the JAX pass:"; cat $$jax_log; rm -f $$jax_log; \
	[ $$tensorflow_status -eq 0 ] && [ $$jax_status -eq 0 ]

test-fast: install-dev ## The tests that train nothing (seconds, not minutes)
	$(BIN)/pytest -m "not slow"

lint: install-dev ## Check style with ruff and the package's floors with import-linter
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports

docs: install ## Regenerate docs/study-files.md, the study-file reference, from the code
	$(BIN)/python -c 'from digitune import study_file; print(study_file.reference(), end="")' > docs/study-files.md

clean: ## Remove studies' databases and the MLflow store (keeps data and .venv)
	rm -rf mlruns/mlflow.db mlruns/artifacts studies/*.db studies/*-keras-tuner-*/
