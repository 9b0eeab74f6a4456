"""One error hierarchy for everything edgellm understands going wrong.

Each error carries a one-line ``message`` and an optional ``hint`` (what to do about it).
Front ends render them their own way: the CLI prints one line and exits with the error's status,
the server answers an OpenAI error body with its HTTP status, the TUI notifies; ``SHOWN`` is the
one table of those statuses. Code decides on an error's type, never on its text. Stdlib only, so
any module may raise these cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass


class EdgeLLMError(Exception):
    """Base class: an error we understand and can explain to the user."""

    def __init__(self, message: str, hint: str | None = None, app_hint: str | None = None) -> None:
        """``hint`` says what to do, in the CLI's words (its flags); ``app_hint``, where the way out
        differs in the terminal app (a setting, a dialog field), in the app's."""
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.app_hint = app_hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def in_app(self) -> str:
        """The error as the terminal app shows it: no flags the app does not have."""
        hint = self.app_hint or self.hint
        return f"{self.message} ({hint})" if hint else self.message

    @property
    def exit_code(self) -> int:
        """The CLI's exit status for this error."""
        return shown(self).exit_code

    @property
    def http_status(self) -> int:
        """The server's HTTP status for this error."""
        return shown(self).http_status

    @property
    def code(self) -> str:
        """A short machine-readable kind: the OpenAI error body's ``code``."""
        return shown(self).code


class UsageError(EdgeLLMError):
    """The user asked for something that makes no sense (bad option value, bad name)."""


class ConfigError(UsageError):
    """A setting from the config file or an EDGELLM_* variable is invalid."""


class ModelNotFoundError(EdgeLLMError):
    """No model, file or Hub repo by that name."""


class ModelExistsError(EdgeLLMError):
    """The store already has a model by that name."""


class StorageError(EdgeLLMError):
    """The store cannot be written (no space, no permission) or holds a damaged entry."""


class InvalidGGUFError(EdgeLLMError):
    """The file is not a GGUF we are willing to hand to llama.cpp."""


class TruncatedGGUFError(InvalidGGUFError):
    """The file ends before its header or data says it should (a partial download, or a header
    read from the first bytes only: more bytes may make it whole)."""


class CheckpointError(EdgeLLMError):
    """A Hugging Face checkpoint (or adapter) folder the converter cannot take."""


class TemplateError(EdgeLLMError):
    """A chat template was refused or failed to render."""


class LoadError(EdgeLLMError):
    """llama.cpp could not load the model or create its context."""


class EngineError(EdgeLLMError):
    """Generation failed inside llama.cpp (a decode that failed, a model unloaded mid-answer)."""


class ToolCallError(EngineError):
    """The model was made to call a tool and wrote a call that the offered tools do not allow."""


class QueueFullError(EdgeLLMError):
    """Every slot is busy and the queue is full: retry shortly."""


class WorkerError(EdgeLLMError):
    """An RPC worker that cannot be used; the message names it."""


class WorkerUnreachableError(WorkerError):
    """Nothing answers at the worker's address (as opposed to a busy or mismatched worker)."""


class HubError(EdgeLLMError):
    """The Hugging Face Hub refused or failed a request, or sent a damaged file."""


class HubUnreachableError(HubError):
    """The Hub cannot be reached at all (offline, DNS, proxy)."""


class QuantizeError(EdgeLLMError):
    """llama.cpp could not quantize the model."""


class ImatrixError(EdgeLLMError):
    """An importance matrix could not be computed, or a file is not one llama.cpp could use."""


class Cancelled(EdgeLLMError):
    """The user stopped long work (a download, conversion, quantization); nothing half-done is kept."""


class DataError(UsageError):
    """A training data file (or one of its lines) the trainer cannot take; the message names the line."""


class TrainingError(EdgeLLMError):
    """Training failed on the way (the loss became NaN, a checkpoint cannot be resumed)."""


class MissingDependencyError(EdgeLLMError):
    """A part this build or machine lacks (an optional package, llama.cpp's RPC backend)."""


@dataclass(frozen=True)
class Shown:
    """What each front end makes of an error: the CLI's exit status, the server's HTTP status and
    error code (the app shows every error as a notification of its message)."""

    exit_code: int
    http_status: int
    code: str


#: The one table of what errors look like. An error not listed is shown as its nearest listed base.
SHOWN: dict[type[EdgeLLMError], Shown] = {
    EdgeLLMError: Shown(1, 500, "edgellm_error"),
    UsageError: Shown(2, 400, "invalid_request"),
    ConfigError: Shown(2, 400, "invalid_config"),
    ModelNotFoundError: Shown(1, 404, "model_not_found"),
    ModelExistsError: Shown(1, 409, "model_exists"),
    StorageError: Shown(1, 500, "storage_error"),
    InvalidGGUFError: Shown(1, 500, "invalid_gguf"),
    TruncatedGGUFError: Shown(1, 500, "truncated_gguf"),
    CheckpointError: Shown(1, 400, "invalid_checkpoint"),
    TemplateError: Shown(1, 500, "template_error"),
    LoadError: Shown(1, 500, "load_error"),
    EngineError: Shown(1, 500, "engine_error"),
    ToolCallError: Shown(1, 502, "invalid_tool_call"),
    QueueFullError: Shown(1, 503, "server_busy"),
    WorkerError: Shown(1, 502, "rpc_worker_error"),
    WorkerUnreachableError: Shown(1, 502, "rpc_worker_unreachable"),
    HubError: Shown(1, 502, "hub_error"),
    HubUnreachableError: Shown(1, 504, "hub_unreachable"),
    QuantizeError: Shown(1, 500, "quantize_error"),
    ImatrixError: Shown(1, 400, "invalid_imatrix"),
    Cancelled: Shown(130, 499, "cancelled"),
    DataError: Shown(2, 400, "invalid_data"),
    TrainingError: Shown(1, 500, "training_error"),
    MissingDependencyError: Shown(1, 500, "missing_dependency"),
}


def shown(exc: EdgeLLMError) -> Shown:
    return next(SHOWN[kind] for kind in type(exc).__mro__ if kind in SHOWN)


def brief(value: object, limit: int = 80) -> str:
    """An untrusted value (a request's model name, a file's string) quoted in a message: repr'd, so
    control characters show as escapes, and cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
