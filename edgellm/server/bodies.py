"""The error bodies every failure of the server takes (4xx/5xx, never a trace), in the shape the
clients of the failing route's API read: each router declares its shape (``ERRORS`` beside it),
and ``error_for`` finds the route a request was for, before routing too (a refused Host, a body
too large), so a refusal is shaped alike wherever it happens.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi.responses import JSONResponse
from starlette.routing import Match

#: (HTTP status, message, code) -> the body a dialect's clients read
ErrorShape = Callable[[int, str, str], dict]


def error_payload(message: str, code: str, kind: str) -> dict:
    """OpenAI's error object, for a response body or, mid-stream, an event."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def openai_error(status: int, message: str, code: str) -> dict:
    return error_payload(message, code, "invalid_request_error" if status < 500 else "server_error")


#: Anthropic's error type for each status
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
              503: "overloaded_error"}


def anthropic_error(status: int, message: str, code: str) -> dict:
    return {"type": "error", "error": {"type": _ANTHROPIC.get(status, "api_error"), "message": message}}


def ollama_error(status: int, message: str, code: str) -> dict:
    return {"error": message}


def error_for(scope: dict, status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    """The error response for a request, in the shape its route's API declares (OpenAI's for a
    path no route takes)."""
    return JSONResponse(shape_for(scope)(status, message, code), status_code=status, headers=headers)


def shape_for(scope: dict) -> ErrorShape:
    """The error shape of the route that takes this request: the one routing chose, else the first
    whose path matches (a request refused before it was routed)."""
    shapes: list[tuple[object, ErrorShape]] = getattr(scope["app"].state, "error_shapes", [])
    routed = scope.get("route")
    if routed is not None:
        return next((shape for route, shape in shapes if route is routed), openai_error)
    return next((shape for route, shape in shapes if route.matches(scope)[0] != Match.NONE), openai_error)
