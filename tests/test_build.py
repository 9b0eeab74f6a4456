"""llama.cpp's build flags are written once, in the Makefile: `make cmake-args` prints them for the
GPU scripts in bench/, which build llama.cpp's own tools as `make chat GPU=cuda` builds the binding."""

from __future__ import annotations

import platform
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cmake_args(*assignments: str) -> list[str]:
    out = subprocess.run(["make", "-s", "--no-print-directory", "cmake-args", *assignments], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return shlex.split(out)


def test_cuda_flags_name_the_architecture_every_kv_kernel_and_rpc() -> None:
    args = cmake_args("GPU=cuda", "CUDA_ARCH=90")
    assert {"-DGGML_CUDA=on", "-DGGML_CUDA_FA_ALL_QUANTS=on", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_RPC=on"} <= set(args)
    if platform.machine() == "x86_64":  # one argument each, as the scripts' eval gives it to cmake
        assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in args


def test_a_cpu_build_has_no_gpu_flags() -> None:
    args = cmake_args("GPU=cpu")
    assert "-DGGML_RPC=on" in args
    assert not [a for a in args if "CUDA" in a or "VULKAN" in a or "METAL" in a]


@pytest.mark.parametrize("script", ["bench/gpu_check.sh", "bench/gpu_prebuild.sh"])
def test_gpu_scripts_take_the_makefiles_flags(script: str) -> None:
    text = (ROOT / script).read_text()
    assert 'make -s cmake-args GPU=cuda CUDA_ARCH="$ARCH"' in text
    assert "GGML_CUDA" not in text and "mno-amx" not in text  # not written a second time
