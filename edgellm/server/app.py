"""The OpenAI-compatible HTTP API: an ASGI app over a ModelPool, with its state on the app.

Every error is an OpenAI error body (``{"error": {"message", "type", "code"}}``) with a 4xx/5xx
status, never a stack trace, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgellm.errors import EdgeLLMError, QueueFullError, UsageError
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.templates import Message
from edgellm.server.models import ModelPool, Served
from edgellm.server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
MAX_BODY = 4 << 20


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    loopback_only: bool = True
    max_body: int = MAX_BODY
    defaults: SamplingOptions = SamplingOptions()


def error_payload(message: str, code: str, kind: str) -> dict:
    """OpenAI's error object, for a response body or, mid-stream, an event."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_body(status: int, message: str, code: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(error_payload(message, code, kind), status_code=status, headers=headers)


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
            return error_body(413, f"request body over {self.limit} bytes", "body_too_large")

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

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if config.loopback_only and _host_name(request.headers.get("host", "")) not in LOOPBACK_NAMES:
            return error_body(403, "this server answers only requests addressed to a loopback name", "host_not_allowed")
        if config.api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                return error_body(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")
        return await call_next(request)

    @app.middleware("http")
    async def log(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        print(f"{request.method} {request.url.path} {response.status_code} {(time.perf_counter() - start) * 1000:.0f}ms",
              file=sys.stderr, flush=True)
        return response

    # outermost, so that a browser's preflight is answered before the API key is asked for (it never
    # carries one) and every answer, errors included, carries the CORS headers
    app.add_middleware(BodyLimit, limit=config.max_body)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["*"], allow_headers=["*"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes, wrong methods, unreadable bodies: OpenAI error bodies too."""
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_body(exc.status_code, str(exc.detail), codes.get(exc.status_code, "invalid_request"),
                          headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_body(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")), "invalid_request")

    @app.exception_handler(EdgeLLMError)
    async def known(_request: Request, exc: EdgeLLMError) -> JSONResponse:
        headers = {"Retry-After": "2"} if isinstance(exc, QueueFullError) else None
        return error_body(exc.http_status, str(exc), exc.code, headers=headers)

    @app.exception_handler(Exception)
    async def unknown(_request: Request, exc: Exception) -> JSONResponse:
        return error_body(500, f"internal error: {type(exc).__name__}", "internal_error")

    @app.get("/health")
    async def health() -> dict:
        if pool.failure:
            return {"status": "degraded", "error": pool.failure}
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        names = await asyncio.to_thread(pool.names)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "edgellm"} for n in names]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        served = await asyncio.to_thread(pool.get, body.model)
        prompt = await asyncio.to_thread(_chat_prompt, served, body.messages)
        grammar = _grammar(body.response_format)
        top = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        gen = _generation(served, body, prompt, max_tokens, config.defaults, grammar, top)
        return await _respond(served, gen, body.stream, "chat", body.stream_options)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        served = await asyncio.to_thread(pool.get, body.model)
        if isinstance(body.prompt, str):
            prompt = await asyncio.to_thread(served.native.tokenize, body.prompt, True)
        elif body.prompt and isinstance(body.prompt[0], int):
            n_vocab = served.native.n_vocab
            bad = [t for t in body.prompt if not 0 <= t < n_vocab]
            if bad:
                raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary of {n_vocab} tokens")
            prompt = list(body.prompt)
        elif len(body.prompt) == 1:
            prompt = served.native.tokenize(body.prompt[0], add_special=True)
        else:
            raise UsageError("only one prompt per request is supported")
        gen = _generation(served, body, prompt, body.max_tokens, config.defaults, None, body.logprobs)
        return await _respond(served, gen, body.stream, "text", body.stream_options)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        served = await asyncio.to_thread(pool.get, body.model)
        texts = [body.input] if isinstance(body.input, str) else body.input
        vectors = await asyncio.to_thread(served.engine.embed, texts)
        data = []
        for i, (vector, _) in enumerate(vectors):
            value: Any = vector
            if body.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        used = sum(n for _, n in vectors)
        return {"object": "list", "model": served.name, "data": data, "usage": {"prompt_tokens": used, "total_tokens": used}}

    return app


def _chat_prompt(served: Served, messages: list) -> list[int]:
    """The prompt tokens of a conversation through the model's template (in a worker thread: a long
    conversation takes a while to render and tokenize)."""
    turns = [Message("system" if m.role == "developer" else m.role, m.text()) for m in messages]
    return served.native.prompt_tokens(served.template.render(turns, True, served.native.bos_text, served.native.eos_text))


def _host_name(host: str) -> str:
    """The name in a Host header without its port; anything malformed comes back whole (and so
    matches no loopback name): ``[::1]:8080`` -> ``[::1]``, ``[::1].evil.com`` stays as it is."""
    if host.startswith("["):
        end = host.find("]")
        rest = host[end + 1:] if end > 0 else "?"
        return host[: end + 1] if rest == "" or (rest.startswith(":") and rest[1:].isdigit()) else host
    name, _, port = host.rpartition(":") if host.count(":") == 1 else (host, "", "")
    return name if port.isdigit() or not port else host


def _grammar(fmt) -> str | None:
    if fmt is None or fmt.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if fmt.type == "json_object":
        return JSON_GBNF
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise UsageError("response_format json_schema needs a schema")
    try:
        return json_schema_to_gbnf(json.dumps(fmt.json_schema.schema_))
    except Exception as exc:  # the converter raises plain exceptions for schemas it cannot express
        raise UsageError(f"response_format json_schema is not supported: {exc}") from None


def _generation(served: Served, body, prompt: list[int], max_tokens: int | None, defaults: SamplingOptions,
                grammar: str | None, logprobs: int | None) -> GenerationRequest:
    n_ctx = served.engine.n_ctx
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens, which does not fit the {n_ctx}-token context")
    if max_tokens is not None and len(prompt) + max_tokens > n_ctx:
        raise UsageError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds the {n_ctx}-token context"
        )
    if body.logit_bias:
        raise UsageError("logit_bias is not supported")
    sampling = replace(
        defaults,
        temperature=defaults.temperature if body.temperature is None else body.temperature,
        top_p=body.top_p or defaults.top_p,
        top_k=defaults.top_k if body.top_k is None else body.top_k,
        min_p=defaults.min_p if body.min_p is None else body.min_p,
        repeat_penalty=body.repeat_penalty or defaults.repeat_penalty,
        max_tokens=max_tokens or -1,
        stop=body.stops(),
        ignore_eos=body.ignore_eos,
    )
    return GenerationRequest(
        prompt=prompt,
        sampling=sampling,
        emit=lambda _: None,  # replaced by _respond
        seed=-1 if body.seed is None else body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        grammar=grammar,
        logprobs=logprobs,
    )


async def _chunks(gen: GenerationRequest, served: Served) -> AsyncIterator[Chunk]:
    """Submit to the engine and yield its Chunks; leaving early (a client gone) frees the slot."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    gen.emit = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
    served.engine.submit(gen)
    try:
        while True:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason:
                return
    finally:
        gen.cancelled.set()


def _logprob_entry(kind: str, lp) -> Any:
    if kind == "chat":
        return {
            "token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode()),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for _, t, p in lp.top],
        }
    return lp


async def _respond(served: Served, gen: GenerationRequest, stream: bool, kind: str, stream_options):
    created = int(time.time())
    ident = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    obj = "chat.completion" if kind == "chat" else "text_completion"
    n_prompt = len(gen.prompt)

    def usage(last: Chunk) -> dict:
        done = last.timings.generated_tokens
        return {"prompt_tokens": n_prompt, "completion_tokens": done, "total_tokens": n_prompt + done}

    def logprobs_block(entries: list) -> dict | None:
        if gen.logprobs is None:
            return None
        if kind == "chat":
            return {"content": [_logprob_entry(kind, lp) for lp in entries]}
        return {
            "tokens": [lp.text for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{t: p for _, t, p in lp.top} for lp in entries],
            "text_offset": [],
        }

    if not stream:
        pieces, entries, last = [], [], None
        async for chunk in _chunks(gen, served):
            pieces.append(chunk.text)
            if chunk.logprobs:
                entries.append(chunk.logprobs)
            last = chunk
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "finish_reason": last.finish_reason, "logprobs": logprobs_block(entries)}
        if kind == "chat":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {"id": ident, "object": obj, "created": created, "model": served.name, "choices": [choice],
                "usage": usage(last), "timings": last.timings.as_dict()}

    include_usage = bool(stream_options and stream_options.include_usage)
    chunks = _chunks(gen, served)
    first = await anext(chunks)  # errors before the first token still become an HTTP error

    async def events() -> AsyncIterator[bytes]:
        def event(choice: dict | None, extra: dict | None = None) -> bytes:
            data = {"id": ident, "object": obj + ".chunk" if kind == "chat" else obj, "created": created,
                    "model": served.name, "choices": [choice] if choice else []}
            data.update(extra or {})
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

        def choice_for(chunk: Chunk, role: bool = False) -> dict:
            c: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason,
                                 "logprobs": logprobs_block([chunk.logprobs]) if chunk.logprobs else None}
            if kind == "chat":
                c["delta"] = {"role": "assistant", "content": chunk.text} if role else (
                    {"content": chunk.text} if chunk.text else {})
            else:
                c["text"] = chunk.text
            return c

        chunk, role = first, True
        try:  # a client that goes away cancels this generator; closing `chunks` frees its slot
            while True:
                yield event(choice_for(chunk, role))
                role = False
                if chunk.finish_reason:
                    if include_usage:
                        yield event(None, {"usage": usage(chunk)})
                    yield b"data: [DONE]\n\n"
                    return
                try:
                    chunk = await anext(chunks)
                except EdgeLLMError as exc:  # too late for an HTTP status: an error event, as OpenAI sends
                    yield f"data: {json.dumps(error_payload(str(exc), exc.code, 'server_error'))}\n\n".encode()
                    return
        finally:
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream")
