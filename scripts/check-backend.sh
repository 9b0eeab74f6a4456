#!/usr/bin/env bash
# Says what a backend's build needs and is missing, in one line, before minutes of compiling.
set -u
case "$1" in
  cuda)
    nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
    [ -x "$nvcc" ] || {
      echo "GPU=cuda needs the CUDA toolkit (nvcc): install it from NVIDIA or your distribution (nvidia-cuda-toolkit)" >&2; exit 2; }
    root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
    ls "$root"/include/cublas_v2.h "$root"/targets/*/include/cublas_v2.h /usr/include/cublas_v2.h >/dev/null 2>&1 || {
      echo "GPU=cuda: the CUDA toolkit at $root lacks cuBLAS (cublas_v2.h), which llama.cpp needs: install the full toolkit" >&2; exit 2; } ;;
  vulkan)
    { command -v glslc >/dev/null 2>&1 && { [ -d /usr/share/cmake/SPIRV-Headers ] || [ -n "${VULKAN_SDK:-}" ]; }; } || {
      echo "GPU=vulkan needs glslc and the Vulkan loader: apt install glslc libvulkan-dev spirv-headers mesa-vulkan-drivers (or the LunarG Vulkan SDK)" >&2; exit 2; } ;;
  metal)
    xcode-select -p >/dev/null 2>&1 || { echo "GPU=metal needs Xcode's command line tools: xcode-select --install" >&2; exit 2; } ;;
esac
exit 0
