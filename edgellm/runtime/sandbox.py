"""Chat templates render in a child process whose memory is capped.

MiniJinja's fuel bounds how many instructions a template runs, not how much memory it takes: a
few instructions that double a string thirty times, or ``('x' * 10**6) * 3000``, ask for gigabytes,
and an allocation that fails inside MiniJinja aborts the whole process (a server, with every
loaded model). So templates render in one long-lived child process, started on first use, with
its address space capped (RLIMIT_AS): a template that asks for too much kills only the child, the
render fails with a clear error, and the next render starts a fresh child. A render that takes
too long is stopped the same way. Requests travel as length-prefixed JSON over its stdin/stdout.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import threading
from typing import Any

from edgellm.errors import TemplateError

#: the child's address space beyond what Python and MiniJinja need to start: a prompt is at most
#: MAX_OUTPUT_CHARS (4 Mi characters), so a real template never comes near it
MEMORY_LIMIT = 256 << 20
#: seconds a render may take (fuel stops loops long before this; it bounds everything else)
TIMEOUT = 20.0
_LENGTH = struct.Struct("<I")


class _Child:
    def __init__(self) -> None:
        # the child imports this very edgellm, wherever it was imported from
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env = dict(os.environ, PYTHONPATH=path)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from edgellm.runtime.sandbox import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
        )

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The child's answer, or None when it died or ran out of time (it is then gone)."""
        data = json.dumps(request).encode()
        try:
            self.proc.stdin.write(_LENGTH.pack(len(data)) + data)
            self.proc.stdin.flush()
            head = self._read(_LENGTH.size)
            return json.loads(self._read(_LENGTH.unpack(head)[0])) if head else None
        except (OSError, ValueError, TimeoutError):
            self.kill()
            return None

    def _read(self, n: int) -> bytes:
        out = b""
        fd = self.proc.stdout.fileno()
        while len(out) < n:
            ready, _, _ = select.select([fd], [], [], TIMEOUT)
            if not ready:
                raise TimeoutError
            piece = os.read(fd, n - len(out))
            if not piece:
                raise OSError("the renderer exited")
            out += piece
        return out

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


_child: _Child | None = None
_lock = threading.Lock()


def render(source: str, origin: str, **variables: Any) -> str:
    """Render ``source`` (a ChatTemplate's) with ``variables`` in the capped child process."""
    global _child
    with _lock:
        if _child is None or _child.proc.poll() is not None:
            _child = _Child()
        answer = _child.ask({"source": source, "origin": origin, "variables": variables})
        if answer is None:
            _child = None
            raise TemplateError(
                f"the {origin} chat template was stopped: it took more than {MEMORY_LIMIT >> 20} MiB of memory "
                f"or {TIMEOUT:.0f} s", hint="use a trusted template with --template FILE")
    if "error" in answer:
        raise TemplateError(answer["error"], answer.get("hint"))
    return answer["text"]


def serve() -> None:
    """The child's loop: cap memory, then render requests until stdin closes."""
    from edgellm.runtime.jinja import CompiledTemplate

    try:
        import resource

        limit = MEMORY_LIMIT + _address_space()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass  # no RLIMIT_AS here (Windows): the timeout still applies
    compiled: dict[tuple[str, str], CompiledTemplate] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while head := stdin.read(_LENGTH.size):
        request = json.loads(stdin.read(_LENGTH.unpack(head)[0]))
        try:
            key = (request["source"], request["origin"])
            if key not in compiled:
                compiled.clear()  # one template at a time is the common case; keep memory flat
                compiled[key] = CompiledTemplate(*key)
            answer: dict[str, Any] = {"text": compiled[key].render(**request["variables"])}
        except TemplateError as exc:
            answer = {"error": exc.message, "hint": exc.hint}
        except MemoryError:
            answer = {"error": f"the {request['origin']} chat template took too much memory and was stopped"}
        data = json.dumps(answer).encode()
        stdout.write(_LENGTH.pack(len(data)) + data)
        stdout.flush()


def _address_space() -> int:
    """This process's address space now (Python, MiniJinja): the cap comes on top of it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 512 << 20
