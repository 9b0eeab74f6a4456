"""llama.cpp's RPC backend: workers that lend their devices, and the remote devices a model uses.

llama-cpp-python ships ``libggml-rpc.so`` when built with ``-DGGML_RPC=on`` but does not wrap it, so
the functions we need are bound here with ctypes, as declared in ``ggml/include/ggml-rpc.h`` of the
llama.cpp it vendors (0.3.36: protocol 7.0.0):

    void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
                                       size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices);
    ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint);

A worker's memory (``ggml_backend_rpc_get_device_memory``) is read through the devices
``add_server`` registers, with ggml's ordinary device API, like any GPU's (system/devices.py).

llama.cpp aborts the whole process when a worker cannot be reached or answers in another protocol
version, and waits without limit for one that accepts and never answers. So before llama.cpp sees
an endpoint, edgellm speaks the protocol's HELLO itself, with connect and read timeouts, and turns
every way that can fail into an error naming the worker. The RPC protocol has no authentication:
a worker listens on loopback unless told otherwise.
"""

from __future__ import annotations

import ctypes
import os
import re
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path

from edgellm.errors import MissingDependencyError, WorkerError, WorkerUnreachableError
from edgellm.system import ggml

PROTO_MAJOR, PROTO_MINOR = 7, 0  # RPC_PROTO_MAJOR/MINOR_VERSION in ggml-rpc.h
CMD_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions
CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE (transport.h): the HELLO request's body
HELLO_RESPONSE = 4 + CONN_CAPS  # major, minor, patch, padding, conn_caps
DEFAULT_PORT = 50052


def hello(endpoint: str, timeout: float = 5.0) -> tuple[int, int, int]:
    """The worker's protocol version, asked the way llama.cpp asks it, but with timeouts."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<BQ", CMD_HELLO, CONN_CAPS) + bytes(CONN_CAPS))
            head = _recv(sock, 8)
            (size,) = struct.unpack("<Q", head)
            if size != HELLO_RESPONSE:
                raise WorkerError(f"worker {endpoint} answered HELLO with {size} bytes, not an RPC worker of "
                                  f"protocol {PROTO_MAJOR}.x")
            major, minor, patch = _recv(sock, size)[:3]
    except WorkerError:
        raise
    except TimeoutError:
        raise WorkerError(f"worker {endpoint} did not answer within {timeout:.0f} s",
                          hint="is it busy with another client? a worker serves one at a time") from None
    except OSError as exc:
        raise WorkerUnreachableError(f"worker {endpoint} is unreachable: {exc.strerror or exc}",
                          hint="start it with `edgellm worker --port PORT` on that machine") from None
    if major != PROTO_MAJOR or minor > PROTO_MINOR:
        raise WorkerError(f"worker {endpoint} speaks RPC protocol {major}.{minor}.{patch}; this build speaks "
                          f"{PROTO_MAJOR}.{PROTO_MINOR}", hint="run the same edgellm/llama.cpp version on both ends")
    return major, minor, patch


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise OSError("the worker closed the connection")
        data += chunk
    return data


def available() -> bool:
    try:
        ggml.rpc()
        return True
    except MissingDependencyError:
        return False


_connected: dict[str, int] = {}  # endpoint -> devices registered: ggml's registry is per process too
_connect_lock = threading.Lock()


def connect(endpoints: tuple[str, ...], timeout: float = 5.0) -> int:
    """Register each worker's devices with ggml (once per process), so models can use them.

    Returns the number of remote devices. Every worker is asked HELLO first: llama.cpp would abort
    the process on one that is down or of another protocol version.
    """
    lib, registry = ggml.rpc(), ggml.registry()
    _install_abort_hook()
    with _connect_lock:
        for endpoint in endpoints:
            if endpoint in _connected:
                continue
            hello(endpoint, timeout)
            reg = lib.ggml_backend_rpc_add_server(endpoint.encode())
            if not reg:
                raise WorkerError(f"llama.cpp could not add worker {endpoint}")
            n = registry.ggml_backend_reg_dev_count(reg)
            for i in range(n):
                registry.ggml_backend_device_register(registry.ggml_backend_reg_dev_get(reg, i))
            _connected[endpoint] = n
        return sum(_connected[e] for e in endpoints)


def check_alive(endpoints: tuple[str, ...], timeout: float = 2.0) -> None:
    """Before loading again in a long-lived process: every worker must still answer HELLO. A dead
    one is named first; one that stays silent is busy (a model the process lost still holds it)."""
    errors = []
    for endpoint in endpoints:
        try:
            hello(endpoint, timeout)
        except WorkerError as exc:
            errors.append(exc)
    if errors:
        raise next((e for e in errors if isinstance(e, WorkerUnreachableError)), errors[0])


def _refuses(endpoint: str) -> bool:
    """Whether nothing listens at the endpoint any more (a busy worker still accepts connections)."""
    host, _, port = endpoint.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
        return False
    except ConnectionRefusedError:
        return True
    except OSError:  # a timeout: alive, with a full queue of connections (ours among them)
        return False


_failure_handlers: list[Callable[[WorkerError], None]] = []


def on_worker_failure(handler: Callable[[WorkerError], None]) -> None:
    """Survive a worker that dies mid-run: ``handler`` hears of it, and the llama.cpp thread that
    found out is parked for good instead of aborting the process (the server uses this to fail
    the requests in flight and stay up). Without a handler the process exits with one line."""
    _failure_handlers.append(handler)


@cache
def _install_abort_hook() -> object:
    """When a worker dies mid-run, llama.cpp aborts the process from its RPC thread; this turns that
    into one line naming the worker (and a clean exit status, or a parked thread), not a core dump."""

    def on_abort(message: bytes | None) -> None:
        text = (message or b"").decode(errors="replace").strip().splitlines()
        cause = re.sub(r"^\S+:\d+: ", "", text[0]) if text else "RPC failure"  # drop llama.cpp's file:line
        dead: list[str] = []
        for _ in range(10):  # the worker's connection may close a moment before its listening socket
            dead = [e for e in _connected if _refuses(e)]
            if dead:
                break
            time.sleep(0.2)
        error = WorkerError(f"worker {', '.join(dead or _connected)} stopped answering; llama.cpp cannot go on "
                            f"without it ({cause})")
        if _failure_handlers and ("RPC" in cause or dead):
            for handler in _failure_handlers:
                handler(error)
            threading.Event().wait()  # never returns: llama.cpp would abort() right after us
        sys.stderr.write(f"error: {error.message}\n")
        sys.stderr.flush()
        os._exit(1)

    hook = ggml.ABORT_CALLBACK(on_abort)
    ggml.registry().ggml_set_abort_callback(hook)
    return hook  # kept alive by the cache: ggml calls it from its own threads


def serve(host: str, port: int, threads: int, cache_dir: Path | None, stop: threading.Event) -> None:
    """Run a worker exposing this machine's CPU until ``stop`` is set (or the process ends).

    llama.cpp's server loop never returns, so it runs in a daemon thread; the caller's thread
    waits on ``stop`` and stays able to take Ctrl-C.
    """
    lib, registry = ggml.rpc(), ggml.registry()
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise WorkerError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    cpu = registry.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    devices = (ctypes.c_void_p * 1)(cpu)
    endpoint = f"{host}:{port}".encode()
    cache = str(cache_dir).encode() if cache_dir else None
    if cache_dir:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    threading.Thread(target=lib.ggml_backend_rpc_start_server, args=(endpoint, cache, threads, 1, devices),
                     name="rpc-worker", daemon=True).start()
    while not stop.wait(0.2):
        pass
