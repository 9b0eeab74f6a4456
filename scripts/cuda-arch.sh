#!/usr/bin/env bash
# Prints the CUDA architectures of the visible NVIDIA GPUs for CMAKE_CUDA_ARCHITECTURES ("90", "86;89").
# Without a visible GPU it fails: a build for "native" needs one, and a build for every architecture
# takes far too long; name one instead (make chat GPU=cuda CUDA_ARCH=89).
set -euo pipefail
caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';') || true
[ -n "$caps" ] || exit 2
echo "$caps"
