#!/usr/bin/env bash
# Run here, before lending time on an NVIDIA machine: builds llama.cpp for CUDA as `make chat GPU=cuda`
# does (CUDA_ARCH, default 90 for the H100/H200; every flash-attention K/V kernel; RPC), with
# llama-bench and llama-server, into dist/llama-cuda-smARCH.tar.xz, which bench/gpu_check.sh uses
# instead of building there: the build is ~5 of that machine's ~15 lent minutes. It needs nvcc, not a
# GPU. A toolkit without cuBLAS gets it from PyPI (nvidia-cublas); the driver library, absent where no
# GPU driver is installed, is stood in for at link time by a stub that defines the symbols ggml-cuda
# calls (the soname is the driver's, so the real libcuda.so.1 is what loads there). Slow on few cores.
set -euo pipefail
cd "$(dirname "$0")/.."
V=0.3.36
ARCH=${CUDA_ARCH:-90}
W=${GPU_PREBUILD_DIR:-$HOME/.cache/edgellm/cuda-prebuild-sm$ARCH}
OUT="dist/llama-cuda-sm$ARCH.tar.xz"

# bin/ (the libraries, their links kept, with llama-bench and llama-server) and the binding's
# llama_cpp/ package: what gpu_check.sh installs instead of building
package() {
  local stage
  stage=$(mktemp -d)
  mkdir -p "$stage/bin"
  cp -a "$1"/build/bin/lib*.so* "$1/build/bin/llama-bench" "$1/build/bin/llama-server" "$stage/bin/"
  cp -r "$1/llama_cpp_python-$V/llama_cpp" "$stage/llama_cpp" && rm -rf "$stage/llama_cpp/lib"
  find "$stage/bin" -type f -exec strip --strip-unneeded {} +  # symbols: not needed to run, ~1 MB carried
  XZ_OPT="-9 -T0" tar cJf "$OUT" -C "$stage" bin llama_cpp
  rm -rf "$stage"
  du -h "$OUT"
}
[ -f "dist/llama_cpp_python-$V.tar.gz" ] || bash bench/gpu_prepare.sh
mkdir -p "$W/stub"
[ -d "$W/llama_cpp_python-$V" ] || tar xzf "dist/llama_cpp_python-$V.tar.gz" -C "$W"
nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
cublas=()
include_flag=""
if ! ls "$root"/include/cublas_v2.h "$root"/targets/*/include/cublas_v2.h >/dev/null 2>&1; then
  release=$("$nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  read -r major minor <<< "$release"
  package=nvidia-cublas; [ "$major" -ge 13 ] || package=nvidia-cublas-cu$major
  if [ ! -d "$W/cublas" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 "$package>=$major.$minor,<$major.$((minor + 1))" \
      -d "$W/wheel"
    python3 -m zipfile -e "$W"/wheel/nvidia_cublas*.whl "$W/cublas"
    rm -rf "$W/wheel"
  fi
  lib=$(dirname "$(find "$W/cublas" -name 'libcublas.so.*' | head -1)")
  include_flag="-I$(dirname "$(find "$W/cublas" -name cublas_v2.h | head -1)")"
  for name in cublas cublasLt; do ln -sf "$(basename "$lib"/lib$name.so.*)" "$lib/lib$name.so"; done
  cublas=(-DCUDA_cublas_LIBRARY="$lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$lib/libcublasLt.so"
          -DCMAKE_CUDA_FLAGS="$include_flag")
  export CPATH="${include_flag#-I}${CPATH:+:$CPATH}"  # the C++ compiler's, beside the Makefile's flags
fi
driver=$(find "$root" /usr/lib* -name 'libcuda.so*' 2>/dev/null | head -1 || true)
if [ -z "$driver" ]; then  # a stub: first empty, then with every cu* symbol libggml-cuda needs
  [ -f "$W/stub/libcuda.so" ] || echo 'void edgellm_stub(void) {}' | gcc -shared -fPIC -x c - -Wl,-soname,libcuda.so.1 -o "$W/stub/libcuda.so"
  driver="$W/stub/libcuda.so"
fi
args=$(make -s cmake-args GPU=cuda CUDA_ARCH="$ARCH")  # the Makefile's, as `make chat GPU=cuda`
eval "flags=($args)"
cmake -S "$W/llama_cpp_python-$V/vendor/llama.cpp" -B "$W/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  "${flags[@]}" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DCUDA_cuda_driver_LIBRARY="$driver" "${cublas[@]}" > "$W/cmake.log"
cmake --build "$W/build" -j"$(nproc)" --target ggml-cuda
if [ "$driver" = "$W/stub/libcuda.so" ]; then
  nm -D --undefined-only "$W/build/bin/libggml-cuda.so" | awk '$2 ~ /^cu[A-Z]/ {print "int " $2 "(void) { return 999; }"}' |
    gcc -shared -fPIC -x c - -Wl,-soname,libcuda.so.1 -o "$W/stub/libcuda.so"
  ln -sf libcuda.so "$W/stub/libcuda.so.1"  # the name the linker looks for, from libggml-cuda's NEEDED
fi
cmake --build "$W/build" -j"$(nproc)" --target llama llama-bench llama-server mtmd
package "$W"
