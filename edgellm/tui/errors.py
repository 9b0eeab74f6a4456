"""How the app words an error: ours with the app's own way out, anything else as internal."""

from __future__ import annotations

from edgellm.errors import EdgeLLMError


def described(exc: BaseException) -> str:
    return exc.in_app() if isinstance(exc, EdgeLLMError) else f"internal error: {type(exc).__name__}: {exc}"
