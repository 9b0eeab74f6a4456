"""The one place llama.cpp's libraries are opened: llama-cpp-python's binding (its log routed to
ours and its backends initialised first) and the ggml libraries the binding ships, which it does
not wrap (the device registry, graph building to ask a device about an op, RPC). Each library's
functions are typed here once, for every module that calls them (devices.py, rpc.py, imatrix.py
and runtime/native.py).
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path
from types import ModuleType

from edgellm.errors import MissingDependencyError


@cache
def llama() -> ModuleType:
    """llama-cpp-python's low-level binding, ready: llama.cpp's log goes to system/llamalog.py
    (before the backends register, so their greetings go to the log, not the terminal) and its
    backends are initialised (which loads libllama, and with it the ggml it links)."""
    import llama_cpp

    from edgellm.system import llamalog

    llamalog.install()
    llama_cpp.llama_backend_init()
    return llama_cpp


def shipped_library(stem: str) -> ctypes.CDLL:
    """One of the binding's ggml libraries, as libllama itself loaded it.

    A wheel cannot hold symlinks, so ``libggml.so`` and ``libggml.so.0`` are two copies of one
    library, each with its own device registry; libllama uses the ``.so.0`` one (its NEEDED
    entry), which is the one whose registry a model sees.
    """
    folder = Path(llama().__file__).parent / "lib"
    for name in (f"{stem}.so.0", f"{stem}.so", f"{stem}.dylib", f"{stem}.dll"):
        if (folder / name).exists():
            return ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
    raise FileNotFoundError(f"{stem} is not in {folder}")


def _typed(lib: ctypes.CDLL, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    for name, (argtypes, restype) in signatures.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    return lib


_P, _S = ctypes.c_void_p, ctypes.c_size_t
#: ggml's abort callback: called with the message before ggml aborts the process
ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@cache
def registry() -> ctypes.CDLL:
    """libggml: the backend and device registry."""
    return _typed(shipped_library("libggml"), {
        "ggml_backend_dev_count": ([], _S),
        "ggml_backend_dev_get": ([_S], _P),
        "ggml_backend_dev_name": ([_P], ctypes.c_char_p),
        "ggml_backend_dev_description": ([_P], ctypes.c_char_p),
        "ggml_backend_dev_type": ([_P], ctypes.c_int),
        "ggml_backend_dev_memory": ([_P, ctypes.POINTER(_S), ctypes.POINTER(_S)], None),
        "ggml_backend_dev_backend_reg": ([_P], _P),
        "ggml_backend_reg_name": ([_P], ctypes.c_char_p),
        "ggml_backend_dev_by_name": ([ctypes.c_char_p], _P),
        "ggml_backend_dev_by_type": ([ctypes.c_int], _P),
        "ggml_backend_dev_supports_op": ([_P, _P], ctypes.c_bool),
        "ggml_backend_reg_get_proc_address": ([_P, ctypes.c_char_p], _P),
        "ggml_backend_reg_dev_count": ([_P], _S),
        "ggml_backend_reg_dev_get": ([_P, _S], _P),
        "ggml_backend_device_register": ([_P], None),
        "ggml_set_abort_callback": ([ABORT_CALLBACK], _P),
    })


class InitParams(ctypes.Structure):
    """ggml.h's ``struct ggml_init_params``."""

    _fields_ = [("mem_size", _S), ("mem_buffer", _P), ("no_alloc", ctypes.c_bool)]


class ThreadpoolParams(ctypes.Structure):
    """ggml.h's ``struct ggml_threadpool_params``."""

    _fields_ = [("cpumask", ctypes.c_bool * 512), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@cache
def base() -> ctypes.CDLL:
    """libggml-base: graph building (to describe an op to a device), tensors' data and sizes, and
    the thread pool's parameters."""
    registry()  # libggml first: the base library it links is then the one already loaded
    i64 = ctypes.c_int64
    return _typed(shipped_library("libggml-base"), {
        "ggml_init": ([InitParams], _P),
        "ggml_free": ([_P], None),
        "ggml_new_tensor_4d": ([_P, ctypes.c_int, i64, i64, i64, i64], _P),
        "ggml_flash_attn_ext": ([_P] * 5 + [ctypes.c_float] * 3, _P),
        "ggml_mul_mat": ([_P] * 3, _P),
        "ggml_op_name": ([ctypes.c_int], ctypes.c_char_p),
        "ggml_nbytes": ([_P], _S),
        "ggml_nelements": ([_P], i64),
        "ggml_backend_buffer_is_host": ([_P], ctypes.c_bool),
        "ggml_backend_tensor_get": ([_P, _P, _S, _S], None),
        "ggml_threadpool_params_init": ([ctypes.POINTER(ThreadpoolParams), ctypes.c_int], None),
    })


@cache
def rpc() -> ctypes.CDLL:
    """libggml-rpc, where this build has it."""
    registry()
    try:
        lib = shipped_library("libggml-rpc")
    except (FileNotFoundError, OSError):
        raise MissingDependencyError(
            "this llama-cpp-python build has no RPC backend",
            hint="rebuild it with CMAKE_ARGS=-DGGML_RPC=on (`make wheel` does; pip needs --no-cache-dir "
                 "--force-reinstall to rebuild the same version)",
        ) from None
    return _typed(lib, {
        "ggml_backend_rpc_start_server": ([ctypes.c_char_p, ctypes.c_char_p, _S, _S, ctypes.POINTER(_P)],
                                          None),
        "ggml_backend_rpc_add_server": ([ctypes.c_char_p], _P),
    })


def system_info() -> str:
    """llama.cpp's own line of what this build uses (SIMD, backends, flash-attention kernels)."""
    return llama().llama_print_system_info().decode().strip()


def supports_gpu_offload() -> bool:
    return bool(llama().llama_supports_gpu_offload())
