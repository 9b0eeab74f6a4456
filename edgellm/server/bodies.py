"""The error bodies every failure of the server takes (4xx/5xx, never a trace): OpenAI's, and on
the Anthropic and Ollama routes the shapes their clients read."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_payload(message: str, code: str, kind: str) -> dict:
    """OpenAI's error object, for a response body or, mid-stream, an event."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(status: int, message: str, code: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_payload(message, code, kind), status_code=status, headers=headers)


#: Anthropic's error type for each status
_ANTHROPIC = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_for(path: str, status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
    """The error body the API at ``path`` is read with: Ollama's ``{"error": message}`` under
    /api/, Anthropic's ``{"type": "error", "error": {...}}`` for Messages, else OpenAI's."""
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    if path.rstrip("/").endswith(("/messages", "/messages/count_tokens")):
        body = {"type": "error", "error": {"type": _ANTHROPIC.get(status, "api_error"), "message": message}}
        return JSONResponse(body, status_code=status, headers=headers)
    return error_body(status, message, code, headers=headers)
