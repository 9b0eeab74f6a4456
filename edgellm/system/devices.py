"""The compute devices llama.cpp sees (CPU, GPUs, accelerators), through ggml's backend registry
(system/ggml.py opens it): used by the benchmark (backend column, machine info), the planner (free
memory per device, the ops a device runs) and the contexts' CPU thread pools.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

from edgellm.system import ggml

_KINDS = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # cpu | gpu | igpu | accel | meta
    backend: str  # the registry it belongs to: CPU, CUDA, Metal, Vulkan, RPC[...] ...
    free: int  # bytes
    total: int  # bytes


def devices() -> list[Device]:
    lib = ggml.registry()
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


def _device(name: str) -> int:
    dev = ggml.registry().ggml_backend_dev_by_name(name.encode())
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
    lib, ops = ggml.registry(), ggml.base()
    dev = _device(device)
    f32, f16, n_kv = 0, 1, 256
    ctx = ops.ggml_init(ggml.InitParams(1 << 20, None, True))
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
    lib, ops = ggml.registry(), ggml.base()
    dev = _device(device)
    ctx = ops.ggml_init(ggml.InitParams(1 << 16, None, True))
    try:
        weight = ops.ggml_new_tensor_4d(ctx, weight_type, rows, cols, 1, 1)
        inputs = ops.ggml_new_tensor_4d(ctx, 0, rows, n_tokens, 1, 1)
        return bool(lib.ggml_backend_dev_supports_op(dev, ops.ggml_mul_mat(ctx, weight, inputs)))
    finally:
        ops.ggml_free(ctx)


@cache
def _threadpool_functions() -> tuple[Callable, Callable, Callable] | None:
    """(params_init, new, free) from the CPU backend in use, as llama.cpp's tools take them; None
    without a CPU backend."""
    lib = ggml.registry()
    dev = lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    reg = lib.ggml_backend_dev_backend_reg(dev) if dev else None
    new = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_new") if reg else None
    free = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_threadpool_free") if reg else None
    if not (new and free):
        return None
    return (ggml.base().ggml_threadpool_params_init,
            ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(ggml.ThreadpoolParams))(new),
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
    params = ggml.ThreadpoolParams()
    init(ctypes.byref(params), n_threads)
    pool = new(ctypes.byref(params))
    if not pool:
        return None
    return pool, lambda: free(pool)
