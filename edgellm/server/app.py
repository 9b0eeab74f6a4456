"""The HTTP server: an ASGI app over a ModelPool, with its state on the app; each API's routes
live in their own module and read that state (openai.py, responses.py, anthropic.py, ollama.py,
ollama_models.py).

Here is what every request passes: the loopback Host check, the API key, the body size limit,
CORS, and the error handlers that make every failure an error body in the shape its API's clients
read (bodies.py) with a 4xx/5xx status, never a stack trace, while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.errors import EdgeLLMError, QueueFullError, brief
from edgellm.options import SamplingOptions
from edgellm.server import anthropic, ollama, ollama_models, openai, responses
from edgellm.server.bodies import error_for
from edgellm.server.models import ModelPool

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
HEALTH = ("/health", "/v1/health")  # answered without the API key, as llama-server's
MAX_BODY = 4 << 20


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    loopback_only: bool = True
    max_body: int = MAX_BODY
    defaults: SamplingOptions = SamplingOptions()


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes however they arrive: a Content-Length over it at
    once, a chunked body as soon as it grows past it (the app then sees the client gone)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"read": 0, "refused": False}

        def too_large() -> JSONResponse:
            return error_for(scope, 413, f"request body over {self.limit} bytes", "body_too_large")

        length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_large()(scope, receive, send)

        async def limited_receive():
            if state["refused"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limit:
                    state["refused"] = True
                    await too_large()(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if not state["refused"]:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)


def create_app(pool: ModelPool, config: ServerConfig) -> FastAPI:
    app = FastAPI(title="edgellm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.config = config
    # plain ASGI wrappers, not BaseHTTPMiddleware: that one passes every streamed event through
    # extra tasks and memory streams, a cost paid for every token of every stream
    app.add_middleware(Disconnect)
    app.add_middleware(Guard)
    app.add_middleware(AccessLog)
    # outermost, so that a browser's preflight is answered before the API key is asked for (it never
    # carries one) and every answer, errors included, carries the CORS headers
    app.add_middleware(BodyLimit, limit=config.max_body)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"])
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    for path in HEALTH:
        app.get(path)(health)
    app.state.error_shapes = []  # (route, the shape of its errors): bodies.error_for reads it
    for dialect, prefixes in DIALECTS:
        app.state.error_shapes += [(route, dialect.ERRORS) for route in dialect.router.routes]  # as routed
        for prefix in prefixes:
            before = len(app.router.routes)
            app.include_router(dialect.router, prefix=prefix)
            app.state.error_shapes += [(route, dialect.ERRORS) for route in app.router.routes[before:]]  # as mounted
    app.include_router(ollama.root)
    app.state.error_shapes += [(route, ollama.ERRORS) for route in ollama.root.routes]
    app.state.responses = responses.Kept()
    return app


#: each API dialect, and the prefixes its routes are served under (OpenAI clients are configured
#: with either base URL; Ollama's routes are its own)
DIALECTS = ((openai, ("/v1", "")), (responses, ("/v1", "")), (anthropic, ("/v1", "")), (ollama, ("",)),
            (ollama_models, ("",)))


class Guard:
    """Who may ask: one Host header, a loopback name while serving on loopback (no DNS rebinding),
    a browser page only from an allowed origin, and the API key when one is set (/health answers
    without it), as OpenAI's clients send it (``Authorization: Bearer KEY``) or Anthropic's
    (``x-api-key: KEY``).

    A browser sends ``Origin`` with every cross-site POST, so a page from elsewhere is refused by
    its origin (loopback pages and ``--cors-origin`` ones are allowed), as Ollama does, not by its
    Content-Type: a body from a client that sends no Origin is read as JSON whatever its
    Content-Type says (litellm's Ollama providers send none, ``curl -d`` a form type)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                return await refusal(scope, receive, send)
            headers = scope.get("headers") or ()
            if not any(name == b"origin" for name, _ in headers) and not _is_json(headers):
                scope = {**scope, "headers": [*(h for h in headers if h[0] != b"content-type"),
                                              (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)

    @staticmethod
    def _refusal(scope) -> JSONResponse | None:
        config: ServerConfig = scope["app"].state.config
        headers = scope.get("headers") or ()
        hosts = [value for name, value in headers if name == b"host"]
        if len(hosts) > 1:  # which one a proxy or this server reads differs: a check of one means nothing
            return error_for(scope, 400, "a request must carry one Host header", "invalid_request")
        host = hosts[0].decode("latin-1") if hosts else ""
        if config.loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            return error_for(scope, 403, "this server answers only requests addressed to a loopback name",
                             "host_not_allowed")
        origins = [value.decode("latin-1") for name, value in headers if name == b"origin"]
        if any(not _origin_allowed(origin, config.cors_origins) for origin in origins):
            return error_for(scope, 403, f"requests from pages at {brief(origins[0])} are not allowed",
                             "origin_not_allowed")
        if config.api_key and scope["path"] not in HEALTH:
            wanted = {b"authorization": f"Bearer {config.api_key}".encode(), b"x-api-key": config.api_key.encode()}
            if not any(hmac.compare_digest(value, wanted[name]) for name, value in headers if name in wanted):
                return error_for(scope, 401,
                                 "missing or wrong API key (Authorization: Bearer KEY, or x-api-key: KEY)",
                                 "invalid_api_key")
        return None


def _origin_allowed(origin: str, allowed: tuple[str, ...]) -> bool:
    """A page's origin may ask: one named by --cors-origin, or a page served from this machine."""
    if origin in allowed or "*" in allowed:
        return True
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and "/" not in rest and _host_name(rest) in LOOPBACK_NAMES


def _is_json(headers) -> bool:
    kind = next((value for name, value in headers if name == b"content-type"), b"")
    media = kind.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


class Disconnect:
    """A request whose client is gone is cancelled at once, streamed or not: the engine frees its
    sequence instead of generating to max_tokens for nobody. The server would otherwise notice
    only when it next writes, and a whole answer is written once, at its end. After the body is
    read, a watcher waits for the client to hang up and cancels the handler; the handler's own
    reads of the request then wait for that same news."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        read, gone, answered = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def handler_receive():
            if read.is_set():  # the body was read: only the news of a disconnect is left to tell
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
            elif not message.get("more_body"):
                read.set()
            return message

        async def watched_send(message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                answered.set()
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, handler_receive, watched_send))

        async def watch() -> None:
            await read.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            if not answered.is_set():
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            if not gone.is_set():
                raise  # the server's own cancellation, not a client gone
        finally:
            watcher.cancel()
            if not handler.done():
                handler.cancel()


class AccessLog:
    """One line per request on stderr: method, path, status (499: the client left first), and the
    time until the answer ended."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [None]

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
            status[0] = status[0] or 499  # returned unanswered: the client went away (nginx's 499)
        finally:
            print(f"{scope['method']} {scope['path']} {status[0] or 500} {(time.perf_counter() - start) * 1000:.0f}ms",
                  file=sys.stderr, flush=True)


async def health(request: Request) -> dict:
    failure = request.app.state.pool.failure
    return {"status": "degraded", "error": failure} if failure else {"status": "ok"}


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes, wrong methods, unreadable bodies: error bodies too."""
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_for(request.scope, exc.status_code, str(exc.detail), codes.get(exc.status_code, "invalid_request"),
                     headers=getattr(exc, "headers", None))


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return error_for(request.scope, 400, message, "invalid_request")


async def _known(request: Request, exc: EdgeLLMError) -> JSONResponse:
    headers = {"Retry-After": "2"} if isinstance(exc, QueueFullError) else None
    return error_for(request.scope, exc.http_status, str(exc), exc.code, headers=headers)


async def _unknown(request: Request, exc: Exception) -> JSONResponse:
    return error_for(request.scope, 500, f"internal error: {type(exc).__name__}", "internal_error")


#: every failure becomes an OpenAI error body; the error table (errors.SHOWN) gives ours their status
ERROR_HANDLERS = {StarletteHTTPException: _http_error, RequestValidationError: _invalid, EdgeLLMError: _known,
                  Exception: _unknown}


def _host_name(host: str) -> str:
    """The name in a Host header without its port; anything malformed comes back whole (and so
    matches no loopback name): ``[::1]:8080`` -> ``[::1]``, ``[::1].evil.com`` stays as it is."""
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:] if end > 0 else "?"
        return host[: end + 1] if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else host
    name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    return name if port.isdigit() or not port else host
