"""edgellm: a local LLM runtime on llama.cpp.

The public API is imported lazily (PEP 562) so that ``import edgellm`` and ``edgellm --help``
stay instant: llama.cpp, numpy and friends load only when a function that needs them runs.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Settings": "edgellm.config",
    "EdgeLLMError": "edgellm.errors",
    "Store": "edgellm.models.store",
    "resolve": "edgellm.models",
    "read_header": "edgellm.gguf.header",
    "load_model": "edgellm.runtime.loader",
    "Model": "edgellm.runtime.engine",
    "LoadOptions": "edgellm.options",
    "SamplingOptions": "edgellm.options",
    "Message": "edgellm.runtime.templates",
    "ChatTemplate": "edgellm.runtime.templates",
    "Chunk": "edgellm.runtime.chunks",
    "Timings": "edgellm.runtime.chunks",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
