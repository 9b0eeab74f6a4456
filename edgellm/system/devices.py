"""The compute devices llama.cpp sees (CPU, GPUs, accelerators), through ggml's backend registry.

llama-cpp-python does not wrap these functions, so we bind the few we need with ctypes from the
ggml library the binding ships. Used by the benchmark (backend column, machine info) and the
planner (free memory per device).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
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

    from edgellm.system import llamalog

    llamalog.install()  # before the backends register: their greetings go to the log, not the terminal
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
    lib.ggml_backend_dev_by_name.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_dev_by_name.restype = ctypes.c_void_p
    lib.ggml_backend_dev_supports_op.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    return lib


def devices() -> list[Device]:
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


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@cache
def _ggml_ops() -> ctypes.CDLL:
    """The few graph-building functions of ggml-base that describe an op to a device."""
    lib = shipped_library("libggml-base")
    lib.ggml_init.argtypes = [_InitParams]
    lib.ggml_init.restype = ctypes.c_void_p
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    lib.ggml_new_tensor_4d.argtypes = [ctypes.c_void_p, ctypes.c_int] + [ctypes.c_int64] * 4
    lib.ggml_new_tensor_4d.restype = ctypes.c_void_p
    lib.ggml_flash_attn_ext.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_float] * 3
    lib.ggml_flash_attn_ext.restype = ctypes.c_void_p
    lib.ggml_mul_mat.argtypes = [ctypes.c_void_p] * 3
    lib.ggml_mul_mat.restype = ctypes.c_void_p
    return lib


def _device(name: str) -> int:
    dev = _ggml().ggml_backend_dev_by_name(name.encode())
    if not dev:
        raise LookupError(f"no device {name!r}")
    return dev


@cache
def flash_attn_pairs(device: str, head_dim_k: int, head_dim_v: int, n_head: int, n_head_kv: int) -> frozenset[tuple[str, str]]:
    """The (K, V) cache type pairs whose flash attention ``device`` runs itself for a model with these
    head sizes. llama.cpp runs an op a device lacks on the CPU instead: a CUDA build without
    GGML_CUDA_FA_ALL_QUANTS decodes a q5_1 cache three times slower. We ask the device exactly as
    llama.cpp's scheduler does, with the op a one-token decode step builds, for every KV cache type."""
    from edgellm.options import KV_TYPES

    types = [(name, ggml_type) for name, (ggml_type, _) in KV_TYPES.items()]
    lib, ops = _ggml(), _ggml_ops()
    dev = _device(device)
    f32, f16, n_kv = 0, 1, 256
    ctx = ops.ggml_init(_InitParams(1 << 20, None, True))
    try:
        supported = set()
        q = ops.ggml_new_tensor_4d(ctx, f32, head_dim_k, 1, n_head, 1)
        mask = ops.ggml_new_tensor_4d(ctx, f16, n_kv, 1, 1, 1)
        for k_name, k_type in types:
            k = ops.ggml_new_tensor_4d(ctx, k_type, head_dim_k, n_kv, n_head_kv, 1)
            for v_name, v_type in types:
                v = ops.ggml_new_tensor_4d(ctx, v_type, head_dim_v, n_kv, n_head_kv, 1)
                op = ops.ggml_flash_attn_ext(ctx, q, k, v, mask, 1.0, 0.0, 0.0)
                if lib.ggml_backend_dev_supports_op(dev, op):
                    supported.add((k_name, v_name))
        return frozenset(supported)
    finally:
        ops.ggml_free(ctx)


@cache
def supports_mul_mat(device: str, weight_type: int, rows: int, cols: int, n_tokens: int) -> bool:
    """Whether ``device`` runs a matmul of this weight (ggml type, ne0 x ne1) with a batch of
    ``n_tokens``: llama.cpp asks the same before it places a weight on the device."""
    lib, ops = _ggml(), _ggml_ops()
    dev = _device(device)
    ctx = ops.ggml_init(_InitParams(1 << 16, None, True))
    try:
        weight = ops.ggml_new_tensor_4d(ctx, weight_type, rows, cols, 1, 1)
        inputs = ops.ggml_new_tensor_4d(ctx, 0, rows, n_tokens, 1, 1)
        return bool(lib.ggml_backend_dev_supports_op(dev, ops.ggml_mul_mat(ctx, weight, inputs)))
    finally:
        ops.ggml_free(ctx)


class _ThreadpoolParams(ctypes.Structure):
    """ggml.h's ``struct ggml_threadpool_params``."""

    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@cache
def _threadpool_functions() -> tuple[Callable, Callable, Callable] | None:
    """(params_init, new, free) from the CPU backend in use, as llama.cpp's tools take them; None
    without a CPU backend."""
    lib = _ggml()
    lib.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    lib.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    new = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new") if reg else None
    free = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free") if reg else None
    if not (new and free):
        return None
    base = shipped_library("libggml-base")
    base.ggml_threadpool_params_init.argtypes = [ctypes.POINTER(_ThreadpoolParams), ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    return (base.ggml_threadpool_params_init,
            ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ThreadpoolParams))(new),
            ctypes.CFUNCTYPE(None, ctypes.c_void_p)(free))


def cpu_threadpool(n_threads: int) -> tuple[int, Callable[[], None]] | None:
    """A persistent pool of CPU threads for a llama.cpp context, and the function that frees it.

    Without one, ggml starts and joins its threads for every graph it computes: every token. Its
    threads poll briefly for the next graph (ggml's default level, 50), as llama-bench's and
    llama-server's do."""
    functions = _threadpool_functions()
    if functions is None:
        return None
    init, new, free = functions
    params = _ThreadpoolParams()
    init(ctypes.byref(params), n_threads)
    pool = new(ctypes.byref(params))
    if not pool:
        return None
    return pool, lambda: free(pool)
