"""OpenAI's error body, the one shape every failure of the server takes (4xx/5xx, never a trace)."""

from __future__ import annotations

from fastapi.responses import JSONResponse


def error_payload(message: str, code: str, kind: str) -> dict:
    """OpenAI's error object, for a response body or, mid-stream, an event."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(status: int, message: str, code: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_payload(message, code, kind), status_code=status, headers=headers)
