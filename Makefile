# openweights-kit: every target is a one-line alias over `kit <verb>` or a script (see README.md).
# Quick start:  make demo   |   make test

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
KIT := $(VENV)/bin/kit
# Default serve profile: the 27B on one H200 where a GPU answers, the embedded CPU demo otherwise.
PROFILE ?= $(shell if nvidia-smi -L >/dev/null 2>&1; then echo h200; else echo cpu-demo; fi)
DRY_RUN ?=
SET ?=
NAME ?=
MODEL ?= qwen3.6-27b
REPO ?=
REVISION ?=
ACCEPT_LICENSE ?=
VERIFY ?=
PYTEST_ARGS ?=


.PHONY: help setup lock models demo test test-unit test-integration lint serve gateway up key key-list key-revoke validate download clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

setup:  ## create .venv with the kit and the vLLM build for this machine (idempotent)
	@bash scripts/setup.sh

models: setup  ## build the embedded models (SmolLM2-135M-Instruct, tiny qwen3_5) into models/
	@$(PY) scripts/build_smollm2.py
	@$(PY) scripts/build_tiny_qwen3_5.py

demo: models  ## serve SmolLM2 with vLLM behind the gateway and stream one answer
	@$(KIT) demo

test: models  ## the whole CPU test suite, real vLLM included (what CI runs)
	@$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup  ## tests that start no vLLM (seconds)
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lock: setup  ## re-resolve requirements/*.lock after a dependency change
	@bash scripts/lock.sh

lint: setup  ## ruff check and format check
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

validate: setup  ## load every shipped config into its schema
	@$(KIT) validate

download: setup  ## fetch + verify MODEL (default qwen3.6-27b) or REPO=org/name REVISION=sha; DRY_RUN=1 lists files
	@$(KIT) download $(if $(REPO),--repo $(REPO),$(MODEL)) $(if $(REVISION),--revision $(REVISION)) $(if $(DRY_RUN),--dry-run) $(if $(ACCEPT_LICENSE),--accept-license) $(if $(VERIFY),--verify)

serve: setup  ## run vLLM for PROFILE (DRY_RUN=1 prints the exact command)
	@$(KIT) serve $(PROFILE) $(if $(DRY_RUN),--dry-run) $(foreach s,$(SET),--set $(s))

gateway: setup  ## run the gateway (configs/gateway.yaml, KIT_GATEWAY_* env)
	@$(KIT) gateway

up: setup  ## vLLM for PROFILE + the gateway, until Ctrl-C
	@$(KIT) up $(PROFILE) $(foreach s,$(SET),--set $(s))

key: setup  ## create a gateway API key: make key NAME=alice
	@$(KIT) key create $(NAME)

key-list: setup  ## list gateway API keys (names and ids, never the keys)
	@$(KIT) key list

key-revoke: setup  ## revoke a key: make key-revoke NAME=alice
	@$(KIT) key revoke $(NAME)

clean:  ## remove the venv, built models and local state
	rm -rf $(VENV) models state .pytest_cache .ruff_cache
