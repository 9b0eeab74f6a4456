"""Hugging Face checkpoints to GGUF, with our own converter on the ``gguf`` package."""

from edgellm.convert.core import ConvertResult, convert

__all__ = ["ConvertResult", "convert"]
