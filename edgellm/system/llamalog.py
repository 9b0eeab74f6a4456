"""Capture llama.cpp's log instead of letting it spray stderr.

llama.cpp explains failures only in its log ("error loading model: ..."), and reports every
buffer it allocates there too. We keep the recent lines so errors can quote the real cause;
``EDGELLM_LLAMA_LOG=1`` (or ``EDGELLM_DEBUG=1``) echoes them to stderr as they come.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues a line)
LEVEL_DEBUG = 1
LEVEL_ERROR = 4
LEVEL_CONT = 5

_lines: deque[tuple[int, int, str]] = deque(maxlen=2000)  # (sequence, level, text)
_lock = threading.Lock()
_state = {"seq": 0, "partial": "", "level": 2}
_callback = None  # keeps the ctypes callback alive
_listeners: list[Callable[[str], None]] = []


def _echo() -> bool:
    return bool(os.environ.get("EDGELLM_LLAMA_LOG") or os.environ.get("EDGELLM_DEBUG"))


def install() -> None:
    """Route llama.cpp's log into our buffer (idempotent)."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback
    def _on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        piece = text.decode("utf-8", errors="replace")
        if _echo():
            sys.stderr.write(piece)
        with _lock:
            if level != LEVEL_CONT:
                _state["level"] = level
            buf = _state["partial"] + piece
            *complete, rest = buf.split("\n")
            for line in complete:
                _state["seq"] += 1
                _lines.append((_state["seq"], _state["level"], line))
            _state["partial"] = rest
            listeners = list(_listeners)
        for line in complete:
            for listener in listeners:
                listener(line)

    _callback = _on_log
    llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def mark() -> int:
    """A position in the log; ``since(mark)`` returns what llama.cpp said after it."""
    with _lock:
        return _state["seq"]


def since(position: int, min_level: int = 0) -> list[str]:
    with _lock:
        return [t for s, lvl, t in _lines if s > position and lvl >= min_level and lvl != LEVEL_DEBUG]


def layers_placed(position: int) -> dict[str, int]:
    """Layers per device as llama.cpp logged placing them (its debug lines) after ``position``."""
    counts: dict[str, int] = {}
    with _lock:
        for s, _lvl, text in _lines:
            match = _PLACED.search(text) if s > position else None
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    return counts


_PLACED = re.compile(r"layer +\d+ assigned to device ([^,\s]+)")
_BUFFER = re.compile(r"(\S+) +(model|KV|compute|output) buffer size = +([0-9.]+) MiB")


def buffers(position: int) -> dict[tuple[str, str], int]:
    """Every buffer llama.cpp logged allocating after ``position``, in bytes, summed by (buffer type,
    part): ``("CUDA0", "KV")``, ``("CUDA_Host", "compute")``, ``("CPU_Mapped", "model")`` ... Buffer
    types named CPU* or *_Host are host memory, the others a device's."""
    found: dict[tuple[str, str], int] = {}
    for line in since(position):
        match = _BUFFER.search(line)
        if match:
            key = (match.group(1), match.group(2))
            found[key] = found.get(key, 0) + round(float(match.group(3)) * 2**20)
    return found


def is_host_buffer(name: str) -> bool:
    return name.startswith("CPU") or name.endswith("_Host")


def buffers_by_part(position: int) -> dict[str, int]:
    """``buffers()`` summed as the planner's parts (MemoryEstimate.parts): ``weights.cpu``,
    ``weights.gpu``, ``kv.cpu``, ``kv.gpu``, ``compute.cpu``, ``compute.gpu``, ``logits``."""
    parts: dict[str, int] = {}
    for (buffer, kind), size in buffers(position).items():
        part = {"model": "weights", "KV": "kv", "compute": "compute"}.get(kind)
        key = "logits" if part is None else f"{part}.{'cpu' if is_host_buffer(buffer) else 'gpu'}"
        parts[key] = parts.get(key, 0) + size
    return parts


def last_error(position: int) -> str | None:
    """The most telling error line llama.cpp logged after ``position``."""
    errors = [line.strip() for line in since(position, LEVEL_ERROR) if line.strip()]
    return errors[0] if errors else None


@contextmanager
def listen(callback: Callable[[str], None]) -> Iterator[None]:
    """Call ``callback`` with each complete log line while the block runs (from llama.cpp's thread).

    This is how per-tensor quantization progress is followed: llama.cpp reports it only in its log.
    """
    install()
    with _lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(callback)
