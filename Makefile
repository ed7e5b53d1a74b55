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
CONFIG_ONLY ?=
RECIPE ?= smollm2-135m-instruct_lora-cpu
DATA ?=
EVAL_DATA ?=
OUTPUT ?=
FORCE ?=
ADAPTER ?=
ADAPTERS ?=
FIX ?=
ACCELERATE ?=
# With ACCELERATE=: one process per GPU on this machine unless NUM_PROCESSES says otherwise.
NUM_PROCESSES ?= $(shell n=$$(nvidia-smi -L 2>/dev/null | wc -l); [ "$$n" -gt 0 ] && echo $$n)
ACCELERATE_ARGS ?=
PYTEST_ARGS ?=


.PHONY: help setup lock models demo test test-unit test-integration lint serve plan install-systemd validate-deploy gateway up key key-list key-set key-rotate key-revoke usage validate download finetune finetune-demo validate-data check-adapter merge bench-finetune bench-gateway soak-ledger soak-agent clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

setup:  ## create .venv with the kit and the vLLM build for this machine (idempotent)
	@bash scripts/setup.sh

models: setup  ## build the embedded models (SmolLM2-135M-Instruct, tiny qwen3_5 and its 64k-position build) into models/
	@$(PY) scripts/build_smollm2.py
	@$(PY) scripts/build_tiny_qwen3_5.py
	@$(PY) scripts/build_tiny_qwen3_5.py --max-position-embeddings 65536 --out models/qwen3_5-tiny-64k

demo: models  ## serve SmolLM2 with vLLM behind the gateway and stream one answer
	@$(KIT) demo

test: models  ## the whole CPU test suite, real vLLM included (what CI runs)
	@$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

test-unit: models  ## tests that start no vLLM (a few minutes; some read the embedded tiny models)
	@$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lock: setup  ## re-resolve requirements/*.lock after a dependency change
	@bash scripts/lock.sh

lint: setup  ## ruff check and format check
	@$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

validate: setup  ## load every shipped config into its schema
	@$(KIT) validate

download: setup  ## fetch + verify MODEL (default qwen3.6-27b) or REPO=org/name REVISION=sha; DRY_RUN=1 lists files
	@$(KIT) download $(if $(REPO),--repo $(REPO),$(MODEL)) $(if $(REVISION),--revision $(REVISION)) $(if $(DRY_RUN),--dry-run) $(if $(ACCEPT_LICENSE),--accept-license) $(if $(VERIFY),--verify) $(if $(CONFIG_ONLY),--config-only)

NEED_DATA = test -n "$(DATA)" || { echo 'error: set DATA=path/to/conversations.jsonl (one {"messages": [...]} per line; see README "Fine-tuning")' >&2; exit 2; }

finetune-demo: models  ## fine-tune SmolLM2 on a synthetic private fact, serve base + adapter, compare answers
	@$(KIT) finetune-demo

validate-data: models  ## check DATA=file.jsonl against RECIPE (no weights load)
	@$(NEED_DATA)
	@$(KIT) validate-data $(RECIPE) --data $(DATA) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA))

# ACCELERATE=ddp|fsdp2|zero3 runs the same verb under `accelerate launch` with configs/accelerate/<name>.yaml
# (NUM_PROCESSES= and ACCELERATE_ARGS="..." pass on to it).
finetune: models  ## LoRA on DATA=file.jsonl with RECIPE (default: the SmolLM2 CPU recipe); FORCE=1 replaces OUTPUT
	@$(NEED_DATA)
	@$(if $(ACCELERATE),test -f configs/accelerate/$(ACCELERATE).yaml || { echo "error: no configs/accelerate/$(ACCELERATE).yaml; ACCELERATE= one of: $$(ls configs/accelerate | sed 's/.yaml//' | xargs)" >&2; exit 2; })
	@$(if $(ACCELERATE),$(VENV)/bin/accelerate launch --config_file configs/accelerate/$(ACCELERATE).yaml $(if $(NUM_PROCESSES),--num_processes $(NUM_PROCESSES)) $(ACCELERATE_ARGS) -m finetune.cli,$(KIT)) \
		finetune $(RECIPE) --data $(DATA) $(if $(EVAL_DATA),--eval-data $(EVAL_DATA)) $(if $(OUTPUT),--output $(OUTPUT)) $(if $(FORCE),--force)

# PROFILE= counts only when given (its default is the machine's serving profile, not the adapter's).
CHECK_PROFILE ?= $(if $(filter command line environment,$(origin PROFILE)),$(PROFILE))
check-adapter: setup  ## check ADAPTER=dir against its recipe's serve profile (or PROFILE=...); FIX=1 rewrites keys
	@$(KIT) check-adapter $(ADAPTER) $(if $(CHECK_PROFILE),--profile $(CHECK_PROFILE)) $(if $(FIX),--fix)

merge: setup  ## merge ADAPTER=dir into its base (OUTPUT=dir, default <adapter>-merged)
	@$(KIT) merge $(ADAPTER) $(if $(OUTPUT),--output $(OUTPUT)) $(if $(FORCE),--force)

BENCH_ARGS ?=
bench-finetune: models  ## LoRA tokens/s and peak memory (BENCH_ARGS="--full-size-qwen3.6 --seq-len 2048" on a GPU)
	@$(PY) scripts/bench_finetune.py $(BENCH_ARGS)

bench-gateway: setup  ## gateway vs direct: added latency, requests/s, TTFT, CPU (BENCH_ARGS=--quick: ~1 min)
	@$(PY) scripts/bench_gateway.py $(BENCH_ARGS)

# Serving benchmark (scripts/bench_serve.py): vLLM's `vllm bench serve` through the gateway and direct.
# Unset = by the profile: CONCURRENCY GPU "1 8 32 64 128", CPU "1 2"; INPUT_LEN/OUTPUT_LEN GPU 1024/1024,
# CPU 64/32; NUM_PROMPTS 4 x concurrency (at least 8). GPU_HOURLY_PRICE: per GPU (CPU profile: the machine),
# default 3.00 (an assumption, not a quote); REFERENCE_PRICE per 1M output tokens, default 7.80 (issue #10).
.PHONY: bench-serve
CONCURRENCY ?=
INPUT_LEN ?=
OUTPUT_LEN ?=
NUM_PROMPTS ?=
GPU_HOURLY_PRICE ?=
REFERENCE_PRICE ?=
bench-serve: models  ## tokens/s, TTFT/TPOT p50/p99 over a concurrency sweep, gateway vs direct, cost per 1M output tokens (JSON + PNG in bench/)
	@$(PY) scripts/bench_serve.py --profile $(PROFILE) $(foreach s,$(SET),--set $(s)) \
		$(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) $(if $(INPUT_LEN),--input-len $(INPUT_LEN)) \
		$(if $(OUTPUT_LEN),--output-len $(OUTPUT_LEN)) $(if $(NUM_PROMPTS),--num-prompts $(NUM_PROMPTS)) \
		$(if $(GPU_HOURLY_PRICE),--gpu-hourly-price $(GPU_HOURLY_PRICE)) \
		$(if $(REFERENCE_PRICE),--reference-price $(REFERENCE_PRICE)) $(BENCH_ARGS)

SOAK_ARGS ?=
soak-ledger: models  ## 10,000 requests, vLLM killed mid-load, every one reconciled with the usage ledger (~6 min)
	@$(PY) scripts/soak_ledger.py $(SOAK_ARGS)

soak-agent: models  ## an openai-SDK agent chains N tool calls (default 1000) through the gateway to real vLLM, 0 protocol errors
	@$(PY) scripts/soak_agent.py --calls $(or $(N),1000) $(SOAK_ARGS)

serve: setup  ## run vLLM for PROFILE (DRY_RUN=1 prints the exact command)
	@$(KIT) serve $(PROFILE) $(if $(DRY_RUN),--dry-run) $(foreach s,$(SET),--set $(s)) $(foreach a,$(ADAPTERS),--adapter $(a))

# SYSTEMD=user (~/.config/systemd/user) or system (/etc/systemd/system; run with sudo); DEST= renders under a prefix.
SYSTEMD ?= user
DEST ?=
install-systemd: setup  ## write systemd units for PROFILE (vLLM + gateway; SYSTEMD=user|system) and print the systemctl commands
	@$(PY) -m serve.systemd install $(PROFILE) --mode $(SYSTEMD) $(if $(DEST),--dest $(DEST)) $(foreach s,$(SET),--set $(s))

validate-deploy: setup  ## check deploy/, compose.yaml and the units with their real validators (systemd-analyze, docker compose, hadolint, Kubernetes schemas)
	@$(PY) -m pytest -q tests/test_deploy_systemd.py tests/test_deploy_containers.py tests/test_deploy_k8s.py tests/test_deploy_postgres_replicas.py $(PYTEST_ARGS)

plan: setup  ## memory plan for PROFILE: weights, KV cache, GDN state per GPU; refuses what cannot start (SET= as serve)
	@$(KIT) plan $(PROFILE) $(foreach s,$(SET),--set $(s))

gateway: setup  ## run the gateway (configs/gateway.yaml, KIT_GATEWAY_* env)
	@$(KIT) gateway

up: setup  ## vLLM for PROFILE + the gateway, until Ctrl-C (ADAPTERS="name=dir ..." serves LoRAs)
	@$(KIT) up $(PROFILE) $(foreach s,$(SET),--set $(s)) $(foreach a,$(ADAPTERS),--adapter $(a))

# `make up` in the background (serve/service.py): record state/service.json, logs state/logs/*.log.
# make logs [LOG=vllm|gateway|service] [N=lines] [FOLLOW=1]; make status exits 0 running, 1 dead, 3 stopped.
.PHONY: start stop status logs
LOG ?= all
FOLLOW ?=
start: setup  ## make up in the background (same PROFILE= SET= ADAPTERS=); returns once a real request answered
	@$(KIT) start $(PROFILE) $(foreach s,$(SET),--set $(s)) $(foreach a,$(ADAPTERS),--adapter $(a))

stop: setup  ## stop the background service: drain in-flight requests, then check that no process is left
	@$(KIT) stop

status: setup  ## the background service: health, models + adapters, GPU memory, uptime, PIDs, logs
	@$(KIT) status

logs: setup  ## the service's logs (LOG=vllm|gateway|service, N=50 lines; FOLLOW=1 follows)
	@$(KIT) logs $(LOG) -n $(or $(N),50) $(if $(FOLLOW),--follow)

# Key policy (each optional; unset = no limit): MODELS=a,b* RPM= TPM= MAX_CONCURRENT= BUDGET_DAY= BUDGET_MONTH=
# MAX_TOKENS= CLAMP=1 MAX_N= THINKING=on|off THINKING_BUDGET= ADMIN=1 EXPIRES=2027-01-31|30d|12h
MODELS ?=
RPM ?=
TPM ?=
MAX_CONCURRENT ?=
BUDGET_DAY ?=
BUDGET_MONTH ?=
MAX_TOKENS ?=
CLAMP ?=
MAX_N ?=
THINKING ?=
THINKING_BUDGET ?=
ADMIN ?=
EXPIRES ?=
GRACE ?= 1h
DAYS ?= 30
KEY_POLICY = $(if $(MODELS),--models '$(MODELS)') $(if $(RPM),--rpm $(RPM)) $(if $(TPM),--tpm $(TPM)) \
	$(if $(MAX_CONCURRENT),--max-concurrent $(MAX_CONCURRENT)) $(if $(BUDGET_DAY),--budget-day $(BUDGET_DAY)) \
	$(if $(BUDGET_MONTH),--budget-month $(BUDGET_MONTH)) $(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS)) \
	$(if $(CLAMP),--clamp) $(if $(MAX_N),--max-n $(MAX_N)) $(if $(THINKING),--thinking $(THINKING)) \
	$(if $(THINKING_BUDGET),--thinking-budget $(THINKING_BUDGET)) $(if $(SYSTEM_POLICY),--system-policy $(SYSTEM_POLICY)) \
	$(if $(ADMIN),--admin)

key: setup  ## create a gateway API key: make key NAME=alice [MODELS=... RPM=... TPM=... BUDGET_DAY=... EXPIRES=30d]
	@$(KIT) key create $(NAME) $(KEY_POLICY) $(if $(EXPIRES),--expires $(EXPIRES))

key-list: setup  ## list gateway API keys: names, ids, expiry, policy (never the keys)
	@$(KIT) key list

key-set: setup  ## change a key's policy: make key-set NAME=alice RPM=60 MODELS='Qwen/*'
	@$(KIT) key set $(NAME) $(KEY_POLICY)

key-rotate: setup  ## new secret for NAME; the old one works for GRACE (default 1h)
	@$(KIT) key rotate $(NAME) --grace $(GRACE)

key-revoke: setup  ## revoke a key (every secret of the name): make key-revoke NAME=alice
	@$(KIT) key revoke $(NAME)

usage: setup  ## usage per day, key and model from the ledger: make usage [NAME=alice] [DAYS=30]
	@$(KIT) usage $(if $(NAME),--key $(NAME)) --days $(DAYS)

clean:  ## remove the venv, built models and local state
	rm -rf $(VENV) models state .pytest_cache .ruff_cache

.PHONY: models-claude-code
models-claude-code: setup  ## build the tiny Qwen3.6-architecture model with 65,536 positions (PROFILE=cpu-claude-code serves it)
	@$(PY) scripts/build_tiny_qwen3_5.py --max-position-embeddings 65536 --out models/qwen3_5-tiny-64k

# Ray cluster for profiles with distributed_executor_backend: ray (README "Past one machine").
ADDRESS ?=
RAY_ARGS ?=
.PHONY: ray-head ray-worker ray-status ray-stop
ray-head: setup  ## start this machine's Ray head node; prints the make ray-worker command (RAY_ARGS="--num-gpus 4 ...")
	@$(PY) -m serve.ray_cluster head $(RAY_ARGS)

ray-worker: setup  ## join this machine to a Ray cluster: make ray-worker ADDRESS=<head ip>:6379
	@test -n "$(ADDRESS)" || { echo 'error: set ADDRESS=<head ip>:6379 (printed by make ray-head)' >&2; exit 2; }
	@$(PY) -m serve.ray_cluster worker $(ADDRESS) $(RAY_ARGS)

ray-status: setup  ## nodes and resources of the Ray cluster this machine is in (ADDRESS= to ask another)
	@$(PY) -m serve.ray_cluster status $(ADDRESS)

ray-stop: setup  ## stop every Ray process on this machine (ray stop)
	@$(PY) -m serve.ray_cluster stop

# Behaviour audit (README "Behaviour audit"; python -m audit): BASE_URL= (default: the kit's gateway) KEY= (else
# $KIT_API_KEY) POLICY_KEY= (a second key, e.g. with the gateway's system-prompt policy: before/after) MODEL=
# (served model or adapter) SUBSET=demo|tiny (default: all 432 prompts) THINKING=off|on|both CONCURRENCY= OUT=
# JUDGE=1 (an LLM judge too) AUDIT_ARGS="..." (any other `python -m audit run` flag, e.g. --forcing-route
# completions). Keys travel in the environment, not on the command line.
.PHONY: audit audit-demo
BASE_URL ?=
KEY ?=
POLICY_KEY ?=
SUBSET ?=
OUT ?=
JUDGE ?=
AUDIT_ARGS ?=
AUDIT_MODEL = $(if $(filter command line environment,$(origin MODEL)),$(MODEL))
audit: setup  ## slant audit of the served model (China vs 8 countries, en+zh): report + JSON + PNGs under OUT
	@$(if $(KEY),KIT_API_KEY='$(KEY)') $(if $(POLICY_KEY),KIT_AUDIT_POLICY_KEY='$(POLICY_KEY)') \
		$(PY) -m audit run $(if $(BASE_URL),--base-url $(BASE_URL)) $(if $(AUDIT_MODEL),--model '$(AUDIT_MODEL)') \
		$(if $(SUBSET),--subset $(SUBSET)) $(if $(THINKING),--thinking $(THINKING)) \
		$(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) $(if $(OUT),--out $(OUT)) $(if $(JUDGE),--judge) $(AUDIT_ARGS)

audit-demo: models  ## the audit end to end on SmolLM2 (CPU): start vLLM + gateway, two keys (with/without the policy), ask, report, stop
	@$(PY) -m audit demo $(if $(OUT),--out $(OUT)) $(if $(SUBSET),--subset $(SUBSET))
