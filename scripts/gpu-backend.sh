#!/usr/bin/env bash
# Prints the llama.cpp backend `make chat GPU=auto` builds for: cuda, metal, vulkan or cpu.
# A device decides, never a toolkit: a machine with CUDA's nvcc and no GPU builds for the CPU.
#   cuda    nvidia-smi -L lists a GPU
#   metal   macOS on Apple silicon
#   vulkan  vulkaninfo lists a discrete, integrated or virtual GPU (Mesa's llvmpipe is a CPU
#           device and does not count)
set -u
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo cuda
elif [ "$(uname -s)" = Darwin ] && [ "$(uname -m)" = arm64 ]; then
  echo metal
elif command -v vulkaninfo >/dev/null 2>&1 && vulkaninfo --summary 2>/dev/null \
    | grep -Eq 'deviceType *= *PHYSICAL_DEVICE_TYPE_(DISCRETE|INTEGRATED|VIRTUAL)_GPU'; then
  echo vulkan
else
  echo cpu
fi
