# Pretraining template. `make help` lists the targets and variables.
# Every target creates .venv on first use; it is refreshed when pyproject.toml changes.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# the exact versions the test suite passed with (torch aside: TORCH= pins it); CONSTRAINTS= installs
# the newest that pyproject.toml's ranges allow instead
CONSTRAINTS ?= constraints.txt
# PY= and STAMP= are the tests' hooks (tests/test_make.py)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# the contract's variables (README, `make help`); empty means "the config's value"
MODEL ?=
# MODEL= picks the experiment of the same name when there is one (configs/experiment/<MODEL>.yaml):
# its learning rate and batch are tuned for that model, where the default experiment's are for tiny
CONFIG ?= $(or $(wildcard configs/experiment/$(MODEL).yaml),configs/experiment/default.yaml)
TEXT ?=
HF ?=
TOKENIZER ?=
DS ?=
NVME_PATH ?=
DEVICES ?=
NNODES ?=
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
HOSTFILE ?=
PARTITION ?=
TIME ?=
ACCOUNT ?=
SIGNAL_LEAD ?=
LAUNCH_TIMEOUT ?= 300
MAX_RESTARTS ?=
PRECISION ?=
MAX_STEPS ?=
RUN ?=
RESUME ?=
INIT ?=
TEACHER ?=
FORCE ?=
QUANT ?=
TASKS ?=
CKPT ?=
PROMPT ?=
OUT ?=
GPU_MEM ?=
CPU_MEM ?=
ARGS ?=
PYTEST_ARGS ?=
STRESS_RUNS ?= 10
TEST_WORKERS ?= 2
NAME ?=

# Values are text, never code. One given on the command line or in the environment is taken as
# typed (`$` and `$(shell ...)` in it are not Make's), and each reaches a command single-quoted by
# `q`, so no shell reads it as code either.
USER_VARIABLES := MODEL CONFIG TEXT HF TOKENIZER DS NVME_PATH DEVICES NNODES NODE_RANK MASTER_ADDR \
	MASTER_PORT HOSTFILE PARTITION TIME ACCOUNT SIGNAL_LEAD LAUNCH_TIMEOUT MAX_RESTARTS PRECISION MAX_STEPS RUN RESUME INIT TEACHER FORCE \
	QUANT TASKS CKPT PROMPT OUT GPU_MEM CPU_MEM ARGS PYTEST_ARGS STRESS_RUNS TEST_WORKERS NAME TORCH CONSTRAINTS PYTHON VENV \
	PY STAMP
$(foreach v,$(USER_VARIABLES),$(if $(filter command environment,$(firstword $(origin $(v)))),\
	$(eval override $(v) := $$(value $(v)))))
q = '$(subst ','\'',$(1))'
# the interpreters as a shell receives them: one quoted word each, so that PYTHON='true; rm x' names a
# program (which is not found) rather than running two commands
python = $(call q,$(PYTHON))
venv_python = $(call q,$(PY))
# .venv and its stamp are Make targets, which are words: a space (or a quote, a colon) in VENV= would
# name other files, and `make clean` would remove them; refused in one line instead
$(foreach v,VENV PY STAMP,$(if $(shell [[ $(call q,$($(v))) =~ ^[A-Za-z0-9_./+@,=~-]+$$ ]] && echo ok),,\
	$(error $(v)=$($(v)): not a path Make can use (a space, a quote or a colon in it); give one of letters, \
	digits and ._/+@,=~- (default VENV=.venv))))
# A variable on the command line that this Makefile never reads (MAX_STEP=5 for MAX_STEPS=5) would
# be ignored without a word: refused, with the nearest name it knows (those it assigns), or the
# name that replaced it (GPUS=, make plan's, is DEVICES= as for every other target)
KNOWN_VARIABLES := $(shell sed -n 's/^\([A-Z][A-Z0-9_]*\) *[?:]*=.*/\1/p' $(firstword $(MAKEFILE_LIST)))
UNKNOWN_VARIABLES := $(filter-out $(KNOWN_VARIABLES),$(foreach v,$(.VARIABLES),$(if $(filter command line,$(origin $(v))),$(v))))
ifneq ($(UNKNOWN_VARIABLES),)
UNKNOWN := $(firstword $(UNKNOWN_VARIABLES))
$(error $(shell $(python) -c 'import difflib, sys; given, known = sys.argv[1], sys.argv[2:]; RENAMED = {"GPUS": "DEVICES"}; \
	near = [RENAMED[given.split("=")[0]]] if given.split("=")[0] in RENAMED else \
	difflib.get_close_matches(given.split("=")[0], known, 1); \
	print(f"{given}: not a variable of this Makefile" + (f"; did you mean {near[0]}?" if near else "") + " (make help lists them)")' \
	$(call q,$(UNKNOWN)=$(value $(UNKNOWN))) $(KNOWN_VARIABLES)))
endif
# ARGS= travels in LLM_ARGS, which the program splits into words as a shell would (llm/argv.py)
WITH_ARGS = $(if $(ARGS),LLM_ARGS=$(call q,$(ARGS)))
LLM = $(WITH_ARGS) $(venv_python) -m llm
# pytest splits PYTEST_ADDOPTS as a shell would (quotes kept: PYTEST_ARGS='-k "a and b"') and runs nothing
PYTEST = $(if $(PYTEST_ARGS),PYTEST_ADDOPTS=$(call q,$(PYTEST_ARGS))) $(venv_python) -m pytest

# an experiment states what differs from the default one, which comes first (configs/experiment/*.yaml)
DEFAULT_CONFIG := configs/experiment/default.yaml
CLI_ARGS = --config $(call q,$(DEFAULT_CONFIG)) $(if $(filter-out $(DEFAULT_CONFIG),$(CONFIG)),--config $(call q,$(CONFIG))) \
	$(if $(MODEL),--model.config=$(call q,configs/model/$(MODEL).yaml)) \
	$(if $(TEXT),--data.text=$(call q,$(TEXT))) \
	$(if $(HF),--data.hf=$(call q,$(HF))) \
	$(if $(TOKENIZER),--data.tokenizer=$(call q,$(TOKENIZER))) \
	$(if $(DS),--deepspeed=$(call q,$(DS))) \
	$(if $(NVME_PATH),--nvme_path=$(call q,$(NVME_PATH))) \
	$(if $(PRECISION),--trainer.precision=$(call q,$(PRECISION))) \
	$(if $(MAX_STEPS),--trainer.max_steps=$(call q,$(MAX_STEPS))) \
	$(if $(RUN),--run=$(call q,$(RUN))) \
	$(if $(RESUME),--resume=$(call q,$(RESUME))) \
	$(if $(INIT),--model.init=$(call q,$(INIT)))
# the processes of a run on this machine; a launcher target gives them to each process itself
LOCAL_ARGS = $(CLI_ARGS) $(if $(DEVICES),--trainer.devices=$(call q,$(DEVICES))) \
	$(if $(NNODES),--trainer.num_nodes=$(call q,$(NNODES)))

# the presets, as the folders hold them: a new file is listed without an edit here
presets = $(subst $(eval) ,$(comma) ,$(sort $(notdir $(basename $(wildcard configs/$(1)/*.yaml)))))
comma := ,
MODEL_PRESETS := $(call presets,model)
DS_PRESETS := $(call presets,deepspeed)
EXPERIMENTS := $(sort $(notdir $(basename $(wildcard configs/experiment/*.yaml))))

.DEFAULT_GOAL := help
.PHONY: help install prepare train distill train-multinode train-deepspeed slurm sample eval export export-fp32 plan bench plot tui wandb-dashboard \
	test test-fast test-long test-gpu test-bench cluster-test stress lint format clean rename

help: ## this list: a target's `##` lines above it are its help
	@echo "Pretrain decoder-only Transformers. Targets:"
	@awk '/^## / { doc[++n] = substr($$0, 4); next } \
		/^[a-z0-9-]+:/ && n { name = $$1; sub(/:.*/, "", name); printf "  make %-15s %s\n", name, doc[1]; \
			for (i = 2; i <= n; i++) printf "  %-20s %s\n", "", doc[i] } { n = 0 }' $(firstword $(MAKEFILE_LIST))
	@echo "Variables (empty: the config's value):"
	@echo "  MODEL=           a preset in configs/model/: $(MODEL_PRESETS);"
	@echo "                   one with an experiment of its name brings it too ($(subst $(eval) ,$(comma) ,$(filter-out default,$(EXPERIMENTS))), tuned for GPUs)"
	@echo "  TEXT=            local text: a .txt, .jsonl or .parquet file, a folder or a glob (default: the embedded corpus)"
	@echo "  HF=              a Hugging Face Hub dataset, name[:config]"
	@echo "  DS=              DeepSpeed preset in configs/deepspeed/: $(DS_PRESETS) (empty: DDP);"
	@echo "                   auto: the fastest that fits one device's memory (ARGS=--memory_gib= to give it), as make plan ranks them"
	@echo "  NVME_PATH=       folder on a fast local disk for DS=zero3_nvme"
	@echo "  TOKENIZER=       a tokenizer.json (default: train a byte-level BPE on the data)"
	@echo "  DEVICES=         processes (devices) per node (default 1; make plan plans for 8)"
	@echo "  NNODES=          nodes (default 1); MIN:MAX for an elastic make train-multinode, which needs RUN="
	@echo "  NODE_RANK=, MASTER_ADDR=, MASTER_PORT=  this node, node 0's address, its port (and the next) for multi-node (0, 127.0.0.1, 29500)"
	@echo "  HOSTFILE=        DeepSpeed hostfile for make train-deepspeed"
	@echo "  PARTITION=, TIME=, ACCOUNT=  sbatch's --partition, --time, --account for make slurm"
	@echo "  SIGNAL_LEAD=     seconds before TIME='s limit at which make slurm's job saves and requeues (default 120)"
	@echo "  LAUNCH_TIMEOUT=  seconds a node waits for node 0 before it gives up (default 300)"
	@echo "  MAX_RESTARTS=    restarts of an elastic job after a node fails or leaves (default 3)"
	@echo "  PRECISION=       32-true, bf16-mixed or 16-mixed (default: 32-true on CPU, bf16-mixed on GPU)"
	@echo "  MAX_STEPS=       optimizer steps"
	@echo "  RUN=             run folder (default runs/<experiment>-<time>)"
	@echo "  INIT=            a Hugging Face model folder (GPT-2 or Llama) to start training from; its architecture wins"
	@echo "  TEACHER=         make distill's teacher: a checkpoint, or a transformers folder whose tokenizer the student takes"
	@echo "  RESUME=          auto (the newest complete checkpoint in RUN=, which it needs) or a checkpoint path"
	@echo "  CONFIG=          an experiment YAML, applied over configs/experiment/default.yaml (default: configs/experiment/<MODEL>.yaml"
	@echo "                   if there is one); ARGS=--print_config shows the result"
	@echo "  ARGS=            further overrides, split as a shell splits words, e.g. ARGS=\"--model.config.n_layer=6\""
	@echo "Every value is text: \$$, quotes, spaces and ; in it reach the program as typed, and nothing in it is run"
	@echo "A variable not listed here is refused, with the nearest name (MAX_STEP=5: did you mean MAX_STEPS?)"
	@echo "  CKPT=, PROMPT=   checkpoint (a file, a DeepSpeed folder, or a run folder: its newest) and prompt for make sample / eval / export / export-fp32;"
	@echo "                   sample and eval without CKPT= take the newest checkpoint under runs/"
	@echo "  TASKS=           make eval's benchmarks: lm-eval task or group names and task YAML files or folders, comma-separated;"
	@echo "                   the same at each validation of make train: ARGS=\"--eval_tasks=val_continuation,task.yaml --eval_limit=200\""
	@echo "  QUANT=           int8, int4 or fp8 (a GPU of compute capability 8.9+): make export quantized by torchao (Llama family)"
	@echo "  GPU_MEM=, CPU_MEM= GiB per GPU and GiB of CPU memory per node, for make plan (with DEVICES=, NNODES=)"
	@echo "  VENV=, PYTHON=   the virtual environment (default .venv: a path without spaces or quotes; make clean removes it"
	@echo "                   only when it is one) and the python that makes it (default python3)"
	@echo "  TORCH=           the torch requirement installed first (default "$(call q,$(TORCH))")"
	@echo "  CONSTRAINTS=     the pinned versions make install uses (default constraints.txt, what the tests passed with;"
	@echo "                   empty: the newest pyproject.toml allows; give it with another TORCH=, whose own pins differ)"

$(STAMP): pyproject.toml $(wildcard $(CONSTRAINTS))
	test -x $(venv_python) || $(python) -m venv $(call q,$(VENV))
	$(venv_python) -m pip install -q $(call q,$(TORCH))
	$(venv_python) -m pip install -q -e ".[dev]" $(if $(CONSTRAINTS),-c $(call q,$(CONSTRAINTS)))
	touch $@

## .venv with the project and its dev extras (every target does this first)
install: $(STAMP)

## text -> tokenizer -> packed token shards in data/ (cached)
prepare: $(STAMP)
	$(LLM) prepare $(LOCAL_ARGS)

## prepare if needed, then train; default: tiny model, embedded corpus, CPU, W&B offline
train: $(STAMP)
	$(LLM) fit $(LOCAL_ARGS)

## train MODEL= (the student) from TEACHER= too (a checkpoint or a transformers folder): its CE plus
## the KL to the teacher's next-token distributions (ARGS="--distill.alpha=0.5 --distill.temperature=2")
distill: $(STAMP)
	$(LLM) fit $(LOCAL_ARGS) --distill.teacher=$(call q,$(TEACHER))

## torchrun on this node, run once per node: NNODES= NODE_RANK= MASTER_ADDR= MASTER_PORT= DEVICES=
## NNODES=MIN:MAX: elastic (c10d rendezvous at MASTER_ADDR:MASTER_PORT, RUN= needed, NODE_RANK unused)
train-multinode: $(STAMP)
	$(LLM) torchrun --nnodes=$(call q,$(or $(NNODES),1)) --node_rank=$(call q,$(NODE_RANK)) \
		$(if $(MAX_RESTARTS),--max_restarts=$(call q,$(MAX_RESTARTS))) \
		--master_addr=$(call q,$(MASTER_ADDR)) --master_port=$(call q,$(MASTER_PORT)) \
		--devices=$(call q,$(or $(DEVICES),1)) --timeout=$(call q,$(LAUNCH_TIMEOUT)) -- $(CLI_ARGS)

## the DeepSpeed launcher over HOSTFILE= ("host slots=N" lines), started on its first host
train-deepspeed: $(STAMP)
	$(LLM) deepspeed --hostfile=$(call q,$(HOSTFILE)) --master_port=$(call q,$(MASTER_PORT)) \
		--timeout=$(call q,$(LAUNCH_TIMEOUT)) -- $(CLI_ARGS)

## submit scripts/slurm/train.sbatch: NNODES= DEVICES= [PARTITION= TIME= ACCOUNT= SIGNAL_LEAD=]; requeues itself;
## one GPU per task where the partition has GPUs (sinfo), else CPU processes
slurm: $(STAMP)
	$(LLM) slurm --nnodes=$(call q,$(or $(NNODES),1)) --devices=$(call q,$(or $(DEVICES),1)) \
		$(if $(PARTITION),--partition=$(call q,$(PARTITION))) $(if $(TIME),--time=$(call q,$(TIME))) \
		$(if $(ACCOUNT),--account=$(call q,$(ACCOUNT))) $(if $(SIGNAL_LEAD),--signal_lead=$(call q,$(SIGNAL_LEAD))) --timeout=$(call q,$(LAUNCH_TIMEOUT)) -- $(CLI_ARGS)

## generated text: make sample [CKPT=runs/<name>] PROMPT="..."
sample: $(STAMP)
	$(LLM) sample --ckpt=$(call q,$(CKPT)) --prompt=$(call q,$(PROMPT))

## loss, perplexity and bits per byte of CKPT= on its run's validation split, or TEXT= / HF= (CKPT= may be an exported folder;
## ARGS=--max_tokens=N bounds it); TASKS=a,b,task.yaml: lm-eval benchmark scores instead, their JSON in OUT= or <run>/eval/
## (ARGS="--num_fewshot=5 --limit=100 --batch_size=8 --seed=1234")
eval: $(STAMP)
	$(LLM) eval --ckpt=$(call q,$(CKPT)) $(if $(TEXT),--text=$(call q,$(TEXT))) $(if $(HF),--hf=$(call q,$(HF))) \
		$(if $(TASKS),--tasks=$(call q,$(TASKS))) $(if $(OUT),--out=$(call q,$(OUT)))

## a Hugging Face transformers folder OUT= of CKPT= (GPT-2 or Llama; QUANT=int8|int4|fp8 for Llama; FORCE=1)
export: $(STAMP)
	$(LLM) export --ckpt=$(call q,$(CKPT)) --out=$(call q,$(OUT)) $(if $(FORCE),--force=$(call q,$(patsubst 0,false,$(patsubst 1,true,$(FORCE))))) $(if $(QUANT),--quant=$(call q,$(QUANT)))

## a DeepSpeed checkpoint folder CKPT= as one fp32 file OUT=
export-fp32: $(STAMP)
	$(LLM) export-fp32 --ckpt=$(call q,$(CKPT)) --out=$(call q,$(OUT))

## memory per ZeRO stage and offload, and the preset to use: MODEL= DEVICES= NNODES= GPU_MEM= [CPU_MEM=]
plan: $(STAMP)
	$(LLM) plan $(if $(MODEL),--model.config=$(call q,$(MODEL))) $(if $(DEVICES),--trainer.devices=$(call q,$(DEVICES))) \
		$(if $(NNODES),--trainer.num_nodes=$(call q,$(NNODES))) $(if $(GPU_MEM),--memory_gib=$(call q,$(GPU_MEM))) \
		$(if $(CPU_MEM),--cpu_mem=$(call q,$(CPU_MEM)))

## each path (eager, compiled, zero1-3) through the trainer and through a plain loop or
## DeepSpeed's own engine, and data preparation: a table and bench.json (ARGS="--paths=[...]")
bench: $(STAMP)
	$(WITH_ARGS) $(venv_python) scripts/bench.py

## PNG charts of a run's loss, optimizer, throughput and memory: make plot RUN=runs/<name>
plot: $(STAMP)
	$(LLM) plot --run=$(call q,$(RUN))

## a run in W&B's terminal viewer (wandb leet): make tui RUN=runs/<name>
tui: $(STAMP)
	$(LLM) tui --run=$(call q,$(RUN))

## save (or, ARGS=--url=..., update) a W&B workspace of every logged metric: needs
## WANDB_API_KEY; WANDB_ENTITY=, WANDB_PROJECT= choose where (ARGS=--x=tokens: tokens on x)
wandb-dashboard: $(STAMP)
	$(LLM) wandb-dashboard

## the CPU test suite, GPUs hidden, in TEST_WORKERS= processes (2; PYTEST_ARGS= to pytest)
test: $(STAMP)
	$(PYTEST) -n $(call q,$(TEST_WORKERS)) --dist loadgroup -m "not long and not gpu and not bench and not stress and not cluster"

## the tests a fork's CI runs: no multi-process runs, no ../shared/data (.github/workflows/ci.yml)
test-fast: $(STAMP)
	$(PYTEST) -n $(call q,$(TEST_WORKERS)) --dist loadgroup -m "not slow and not shared_data and not long and not gpu and not bench and not stress and not cluster"

## the end-to-end runs: every docs/extending.md recipe, the launchers (torchrun, DeepSpeed,
## SLURM), the presets at smoke size, compiled and CPU-offload runs, fault runs, Shakespeare
test-long: $(STAMP)
	$(PYTEST) -n $(call q,$(TEST_WORKERS)) --dist loadgroup -m "long and not gpu and not cluster"

## the GPU-only tests (compiled bf16, ZeRO on one GPU, no host sync between logging steps)
test-gpu: $(STAMP)
	LLM_TEST_GPU=1 $(PYTEST) -m gpu

## the test of make bench itself (minutes: the benchmark compiles and runs every path)
test-bench: $(STAMP)
	$(PYTEST) -m bench

## the launchers on real cluster software: make slurm on a one-host SLURM cluster (preemption, time
## limits, signals), make train-multinode on two network-namespace hosts; as root, with Debian's
## slurm-wlm, munge and iproute2 (skipped without them; .ci/run installs them)
cluster-test: $(STAMP)
	$(PYTEST) -m cluster

## the stress tests, then STRESS_RUNS= 2-process ZeRO-2 CPU runs in a row, each bounded
## in time (default 10), the stacks of a hung one printed
stress: $(STAMP)
	$(PYTEST) -m stress
	$(WITH_ARGS) $(venv_python) scripts/stress.py --runs=$(call q,$(STRESS_RUNS))

## ruff check and format check; the package's types (mypy) and import layers (import-linter)
lint: $(STAMP)
	$(venv_python) -m ruff check llm tests scripts
	$(venv_python) -m ruff format --check llm tests scripts
	$(venv_python) -m mypy
	$(call q,$(VENV)/bin/lint-imports)

## ruff: fix what it can and format
format: $(STAMP)
	$(venv_python) -m ruff check --fix llm tests scripts
	$(venv_python) -m ruff format llm tests scripts

## give a fork its own package name: make rename NAME=mylm (docs/extending.md)
rename:
	$(python) scripts/rename.py $(call q,$(NAME))

## remove .venv and the tool caches; never data/ or runs/
clean:
	@if [ -e $(call q,$(VENV)) ] && [ ! -f $(call q,$(VENV)/pyvenv.cfg) ]; then \
		echo "VENV="$(call q,$(VENV))": not a virtual environment (no pyvenv.cfg in it), so not removed; give the one make install made (default .venv)" >&2; \
		exit 2; fi
	rm -rf -- $(call q,$(VENV)) .pytest_cache .ruff_cache .mypy_cache  # never data/ or runs/: they hold work
