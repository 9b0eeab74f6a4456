"""Where llama.cpp's own tools come from for the comparisons: built from the llama.cpp sources
vendored in the installed llama-cpp-python's sdist, by ../shared/tools/llama-cpp-reference."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from functools import cache
from pathlib import Path

REFERENCE_TOOL = Path(__file__).resolve().parents[2] / "shared" / "tools" / "llama-cpp-reference"
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # as the Makefile builds the binding


@cache
def reference_bin() -> Path:
    env = dict(os.environ, PYTHON=sys.executable)
    if os.uname().machine == "x86_64":
        env.update(CFLAGS=NO_AMX, CXXFLAGS=NO_AMX)
    root = subprocess.run([str(REFERENCE_TOOL)], capture_output=True, text=True, check=True, env=env).stdout
    return Path(root.strip()) / "bin"


def edgellm_serve(model: str, port: int, streams: int, ctx: int, threads: int, ngl: int = 0) -> list[str]:
    """`edgellm serve` with ``streams`` slots of ``ctx`` tokens, as every serving comparison runs it."""
    return [sys.executable, "-m", "edgellm", "serve", model, "--port", str(port), "--parallel", str(streams),
            "--ctx", str(ctx), "-t", str(threads), "--flash-attn", "on", "--gpu-layers", str(ngl)]


def llama_server(binary: str, model: str, port: int, streams: int, ctx: int, threads: int, ngl: int = 0) -> list[str]:
    """llama-server with the same slots, context per slot, threads, flash attention and offload."""
    return [binary, "-m", model, "--port", str(port), "-np", str(streams), "-c", str(ctx * streams),
            "-t", str(threads), "-fa", "on", "-ngl", str(ngl)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], url: str, env: dict, timeout: float = 120) -> subprocess.Popen:
    """Start a server with its log in a file (a full pipe would stall a chatty one) and wait for it."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(log.read().decode(errors="replace")[-2000:] or "exited")
            time.sleep(0.3)
    proc.terminate()
    raise RuntimeError(f"{url} did not come up")
