"""One error hierarchy for everything edgellm understands going wrong.

Each error carries a one-line ``message`` and an optional ``hint`` (what to do about it).
Front ends render them their own way: the CLI prints one line, the server an OpenAI error
body, the TUI a notification. Stdlib only, so any module may raise these cheaply.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base class: an error we understand and can explain to the user."""

    #: process exit status the CLI uses for this kind of error
    exit_code = 1
    #: short machine-readable kind, used as the OpenAI error ``type``/``code``
    code = "edgellm_error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(EdgeLLMError):
    """The user asked for something that makes no sense (bad option value, bad name)."""

    exit_code = 2
    code = "invalid_request"


class ConfigError(UsageError):
    """A setting from the config file or an EDGELLM_* variable is invalid."""

    code = "invalid_config"


class ModelNotFoundError(EdgeLLMError):
    code = "model_not_found"


class ModelExistsError(EdgeLLMError):
    code = "model_exists"


class InvalidGGUFError(EdgeLLMError):
    """The file is not a GGUF we are willing to hand to llama.cpp."""

    code = "invalid_gguf"


class TemplateError(EdgeLLMError):
    """A chat template was refused or failed to render."""

    code = "template_error"


class LoadError(EdgeLLMError):
    """llama.cpp could not load the model or create its context."""

    code = "load_error"


class Cancelled(EdgeLLMError):
    """The user stopped long work (a download, conversion, quantization); nothing half-done is kept."""

    exit_code = 130
    code = "cancelled"


class MissingDependencyError(EdgeLLMError):
    code = "missing_dependency"


def brief(value: object, limit: int = 80) -> str:
    """An untrusted value (a request's model name, a file's string) quoted in a message: repr'd, so
    control characters show as escapes, and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
