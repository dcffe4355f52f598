# The Makefile is the contract: each target sets up what it needs on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export BENTOML_DO_NOT_TRACK := true
# BentoML's model store: $BENTOML_HOME, else bentoml_home/ in the checkout. Defined once, in
# service/model_registry.py, which every entry point below goes through.

.PHONY: install serve test test-fast lint train evaluate bench gpu-wheels import-model clean image up down

install: $(STAMP)

# torch first: with no torch present, pip would resolve a multi-GB CUDA build on its own. On these
# machines `torch==2.13.0` is a local CPU wheel; elsewhere, without a GPU, point TORCH_PIP_ARGS at
# PyTorch's CPU index (see README). The project's range keeps whatever torch is installed here.
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIP_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $@

import-model: $(STAMP)
	$(PY) -m service.model_registry import models/acsf1-forecaster

HOST ?= 127.0.0.1
PORT ?= 3000
# `python -m`, not the console script: this checkout's code and store, whichever checkout the
# venv was installed from.
serve: $(STAMP)
	$(PY) -m client.cli serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Retrains the shipped model in place (--force), on one thread as it was trained (--threads 1):
# each series in its own running units (half-life 16 steps), the scaled targets clipped at 10.
train: $(STAMP)
	$(PY) -m model.train --out models/acsf1-forecaster --name acsf1-forecaster --threads 1 --force \
		--scaling running --scale-halflife 16 --target-clip 10

# The held-out scale-free table and calibration table of a checkpoint (the shipped one unless
# MODEL=dir; CSV=file for a model trained on a CSV). WRITE_CARD=1 writes them into its card.json.
MODEL ?= models/acsf1-forecaster
evaluate: $(STAMP)
	$(PY) -m model.evaluate --model $(MODEL) $(if $(CSV),--csv $(CSV),) $(if $(WRITE_CARD),--write-card,)

# Each script prints its table and writes JSON (and the load/scale ones a PNG) under runs/bench/
# (git-ignored); `make bench RECORD=1` writes the committed bench/results/ that the README quotes.
BENCH_FLAGS := $(if $(RECORD),--record,)
bench: $(STAMP)
	$(PY) bench/model_bench.py $(BENCH_FLAGS)
	$(PY) bench/model_bench.py --device cpu --block 20 --steps 1 $(BENCH_FLAGS)
	$(PY) bench/round_bench.py $(BENCH_FLAGS)
	$(PY) bench/load_bench.py $(BENCH_FLAGS)
	$(PY) bench/load_bench.py --journal $(BENCH_FLAGS)
	$(PY) bench/scale_bench.py $(BENCH_FLAGS)
	$(PY) bench/store_bench.py $(BENCH_FLAGS)

# A GPU device run (bench/gpu_run.sh, issue 14): the wheels of the service core that the device
# image (Python 3.12, a CUDA torch, no BentoML) lacks, into .whl/ (git-ignored), to carry there.
gpu-wheels: $(STAMP)
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl pydantic==2.14.4 pydantic_core==2.50.5 \
		annotated-types==0.8.0 typing-inspection==0.4.5 orjson==3.13.0 redis==8.1.0

# The Compose stack (docker-compose.yml): docker compose where a Docker engine answers, else
# podman-compose; offline (no image registry) every image is built here from Debian's packages.
# See deploy/stack.sh. TLS=1: https at nginx; KEYS=keys.txt: API keys. `make down` keeps the named volume with the sessions (VOLUMES=1 removes it).
image:
	deploy/stack.sh image

up:
	$(if $(TLS),LSTM_TLS=1 ,)$(if $(KEYS),LSTM_KEYS_FILE=$(KEYS) ,)deploy/stack.sh up

down:
	$(if $(TLS),LSTM_TLS=1 ,)$(if $(KEYS),LSTM_KEYS_FILE=$(KEYS) ,)deploy/stack.sh down $(if $(VOLUMES),--volumes,)

clean:
	rm -rf $(VENV) bentoml_home .pytest_cache .mypy_cache .ruff_cache
