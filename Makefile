# Two entry points do all set-up on a fresh Debian machine with python3:
#   make serve   venv + install + dataset + (make the default models if the store lacks them) + serve
#   make test    venv + install + dataset + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 3000
HOST ?= 127.0.0.1
DATASET := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# The container test builds the image with buildah from a debootstrapped Debian base; the page
# tests drive Debian's chromium with Playwright (its own browser download is not used).
CONTAINER_TOOLS := /usr/bin/buildah /usr/sbin/debootstrap
BROWSER := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install dataset container-tools browser serve test test-fast test-long lint bench profile \
	perf perf-analyzer \
	profile-before-after fuzz soak \
	models detector siamese stylizer transfer evaluate clean

install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[train,loadtest,dev]'
	touch $@

dataset: $(DATASET)

$(DATASET):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

container-tools: $(CONTAINER_TOOLS)

$(CONTAINER_TOOLS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq buildah debootstrap

serve: install dataset
	$(BIN)/convserve serve --train-if-missing --host $(HOST) --port $(PORT)

# The models the README serves, each made once if the store lacks it (`convserve prepare`):
# the default LeNet-5 and EfficientNet-Lite0 (ImageNet), the detector (about 20 minutes of
# training), the Siamese verifier (minutes) and the 26-style network (imported).
models: install dataset
	$(BIN)/convserve prepare

detector: install dataset
	$(BIN)/convserve prepare fashion-detector

siamese: install dataset
	$(BIN)/convserve prepare fashion-siamese

stylizer: install
	$(BIN)/convserve prepare styletransfer-multistyle26

# The transfer-learning table of docs/model-zoo.md: EfficientNet-Lite0 on 50 Fashion-MNIST
# images per class, from ImageNet (frozen, fine-tuned) and from scratch (about 45 minutes).
transfer: install dataset
	$(BIN)/python -m convserve.models.transfer --out docs/zoo/transfer

# The accuracy goals measured through a running server, as a client sees the models: serve
# them first (`make models`, then `convserve serve --models fashion-detector:latest,
# fashion-siamese:latest,styletransfer-multistyle26:latest` in another terminal).
evaluate: install dataset
	$(BIN)/python -m convserve.loadtest.evaluate detect --url http://$(HOST):$(PORT) \
	  --out docs/zoo/detector/served.json
	$(BIN)/python -m convserve.loadtest.evaluate verify --url http://$(HOST):$(PORT) \
	  --out docs/zoo/siamese/served.json
	$(BIN)/python -m convserve.loadtest.evaluate stylize --url http://$(HOST):$(PORT) \
	  --out docs/zoo/stylizer/served.json

# KServe's published SDK, read (never installed) by the test of deploy/kserve: its schema.
KSERVE_WHEEL := .cache/kserve/kserve-0.15.2-py3-none-any.whl

browser: $(BROWSER)

$(KSERVE_WHEEL): $(BIN)/.installed
	$(BIN)/python -m pip download --quiet --no-deps kserve==0.15.2 -d .cache/kserve

$(BROWSER):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq chromium

test: install dataset container-tools browser $(KSERVE_WHEEL) perf-analyzer
	$(BIN)/python -m pytest

# What the default run leaves out for time: the container build that trains its own model.
test-long: install dataset container-tools $(KSERVE_WHEEL)
	$(BIN)/python -m pytest -m long

test-fast: install dataset $(KSERVE_WHEEL)
	$(BIN)/python -m pytest -m "not slow"

# Long runs, never part of `make test`: both need a served model in the store (`make serve`
# makes one) and use both cores, server pinned to one, load generator to the other. The peers
# that need their own environment make it on first use (.cache/peers): Triton runs on Debian's
# Python, TorchServe on a Java 17 runtime.
PEER_TOOLS := /usr/bin/java /usr/lib/python3.11/ensurepip

$(PEER_TOOLS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq openjdk-17-jre-headless python3-venv

bench: install dataset $(PEER_TOOLS)
	$(BIN)/python -m convserve.loadtest.bench --out docs/bench --checkpoint runs/default/best.pt

# Triton's perf_analyzer (from tritonclient 2.50.0's manylinux wheel, unpacked into
# .cache/perf_analyzer with the CUDA runtime library it links; no GPU is used) and the libb64
# it needs from Debian. `make perf` measures convserve and Triton with it (docs/bench/perf-analyzer).
LIBB64 := /usr/lib/x86_64-linux-gnu/libb64.so.0d
PERF_ANALYZER := .cache/perf_analyzer/bin/perf_analyzer

$(LIBB64):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq libb64-0d

$(PERF_ANALYZER): $(BIN)/.installed | $(LIBB64)
	$(BIN)/python -c "from convserve.loadtest.perf_analyzer import ensure; ensure()"

perf-analyzer: $(LIBB64) $(PERF_ANALYZER)

perf: install dataset perf-analyzer $(PEER_TOOLS)
	$(BIN)/python -m convserve.loadtest.perf_analyzer --out docs/bench/perf-analyzer

# wrk measures the HTTP floors beside the profile (the profile runs without it, floors left out).
WRK := /usr/bin/wrk

$(WRK):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq wrk

profile: install $(WRK)
	$(BIN)/python -m convserve.loadtest.profile --out docs/bench/profile --label now

# An older commit (BEFORE, default the one before the serving core's restructuring) against the
# checkout: the same profile at 64 users, each server pinned to one core, alternating three
# times (a run's noise is larger than the difference), one table.
BEFORE ?= 3c4d35d
profile-before-after: install $(WRK)
	rm -rf build/before build/before-site docs/bench/profile-core
	git worktree add -f build/before $(BEFORE)
	$(BIN)/python -m pip install --quiet --no-deps --target build/before-site build/before
	git worktree remove --force build/before
	for i in 1 2 3; do \
	  $(BIN)/python -m convserve.loadtest.profile --out docs/bench/profile-core --users 64 \
	    --label before-$$i --server-pythonpath $(CURDIR)/build/before-site --cwd /tmp && \
	  $(BIN)/python -m convserve.loadtest.profile --out docs/bench/profile-core --users 64 \
	    --label after-$$i || exit 1; \
	done

# The fuzz tests with 2,000 cases per operation and decoder (the default run uses 200).
fuzz: install dataset
	CONVSERVE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest tests/test_fuzz.py

# Locust at ~80 % of measured capacity on mixed endpoints with ~5 % bad inputs, bounded in
# time (SOAK_MINUTES, default 20); reports the RSS slope, errors and latency to docs/soak.
SOAK_MINUTES ?= 20
soak: install dataset
	$(BIN)/python -m convserve.loadtest.soak --minutes $(SOAK_MINUTES) --out docs/soak

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache .pytest_cache runs
