"""Where llama.cpp's own tools come from for the comparisons: built from the llama.cpp sources
vendored in the installed llama-cpp-python's sdist, by ../shared/tools/llama-cpp-reference."""

from __future__ import annotations

import os
import subprocess
import sys
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
