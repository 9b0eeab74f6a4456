"""The compute devices llama.cpp sees (CPU, GPUs, accelerators), through ggml's backend registry.

llama-cpp-python does not wrap these functions, so we bind the few we need with ctypes from the
ggml library the binding ships. Used by the benchmark (backend column, machine info) and the
planner (free memory per device).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel | meta
    backend: str  # the registry it belongs to: CPU, CUDA, Metal, Vulkan, RPC[...] ...
    free: int  # bytes
    total: int  # bytes


def shipped_library(stem: str) -> ctypes.CDLL:
    """One of the binding's ggml libraries, as libllama itself loaded it.

    A wheel cannot hold symlinks, so ``libggml.so`` and ``libggml.so.0`` are two copies of one
    library, each with its own device registry; libllama uses the ``.so.0`` one (its NEEDED
    entry), which is the one whose registry a model sees.
    """
    import llama_cpp

    folder = Path(llama_cpp.__file__).parent / "lib"
    for name in (f"{stem}.so.0", f"{stem}.so", f"{stem}.dylib", f"{stem}.dll"):
        if (folder / name).exists():
            return ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
    raise FileNotFoundError(f"{stem} is not in {folder}")


@cache
def _ggml() -> ctypes.CDLL:
    import llama_cpp

    llama_cpp.llama_backend_init()  # loads libllama, and with it the ggml it links
    lib = shipped_library("libggml")
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    lib.ggml_backend_dev_memory.restype = None
    lib.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    return lib


def devices() -> list[Device]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    lib = _ggml()
    found = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(
            Device(
                name=lib.ggml_backend_dev_name(dev).decode(),
                description=lib.ggml_backend_dev_description(dev).decode(),
                kind=_KINDS.get(lib.ggml_backend_dev_type(dev), "unknown"),
                backend=lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode(),
                free=free.value,
                total=total.value,
            )
        )
    return found


def backend_label(found: list[Device] | None = None) -> str:
    """What llama-bench prints in its backend column: the non-CPU backends, else ``CPU``."""
    names = []
    for dev in found if found is not None else devices():
        name = "RPC" if dev.backend.startswith("RPC") else dev.backend
        if name != "CPU" and name not in names:
            names.append(name)
    return ",".join(names) or "CPU"
