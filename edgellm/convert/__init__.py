"""Hugging Face checkpoints to GGUF, with our own converter on the ``gguf`` package.

llama.cpp's libraries are loaded before gguf-py (which loads sentencepiece's C++ extension): in the
other order a CUDA build of llama.cpp crashes in the next model load of the same process, as when
the app converts a checkpoint and then chats with it.
"""

from edgellm.system import ggml

ggml.llama()  # first, see above

from edgellm.convert.core import convert
from edgellm.convert.writer import ConvertResult

__all__ = ["ConvertResult", "convert"]
