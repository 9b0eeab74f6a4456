"""Ollama's API, so the many apps that only speak Ollama use edgellm unchanged: chat and generate
(streamed as newline-delimited JSON by default, as Ollama does), embeddings, the model list, a
model's details, the loaded models and the version. Models are named by their store names."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import Field, StrictBool, StrictInt, StrictStr

from edgellm import __version__
from edgellm.errors import EdgeLLMError, UsageError
from edgellm.gguf.header import format_params
from edgellm.runtime.chunks import Chunk, joined
from edgellm.runtime.request import CallRules, GenerationSpec
from edgellm.runtime.templates import Message
from edgellm.runtime.tools import MAX_TOOLS, Tool, ToolCall
from edgellm.runtime.toolstream import Content
from edgellm.server.bodies import ollama_error
from edgellm.server.generation import (
    Ended,
    Paced,
    Reading,
    Thought,
    answer_items,
    prepared,
    served_model,
)
from edgellm.server.schemas import MAX_EMBED_INPUTS, MAX_MESSAGES, MAX_NAME, Body, ToolDef
from edgellm.server.streaming import EventStream

router = APIRouter(prefix="/api")
#: the error bodies this API's clients read
ERRORS = ollama_error

#: the Ollama API version these routes follow (apps check it before using newer fields)
OLLAMA_VERSION = "0.9.0"


class Options(Body):
    """The ``options`` Ollama takes that mean something here; the rest (num_ctx, num_gpu, ...) are
    the server's own settings and are ignored, as unknown fields are."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_k: StrictInt | None = Field(None, ge=0, le=100_000)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: StrictInt | None = None
    num_predict: StrictInt | None = Field(None, ge=-2, le=1 << 20)
    stop: Annotated[list[StrictStr], Field(max_length=16)] | None = None
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)


class CalledFunction(Body):
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(Body):
    function: CalledFunction


class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: StrictStr = ""
    images: list[StrictStr] | None = None
    tool_calls: Annotated[list[OllamaToolCall], Field(max_length=MAX_TOOLS)] | None = None


class _Generating(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    stream: StrictBool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    keep_alive: StrictStr | StrictInt | float | None = None  # a duration ("5m") or seconds


class ChatRequest(_Generating):
    messages: Annotated[list[OllamaMessage], Field(max_length=MAX_MESSAGES)] = Field(default_factory=list)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None


class GenerateRequest(_Generating):
    prompt: StrictStr = ""
    system: StrictStr | None = None
    raw: StrictBool = False
    images: list[StrictStr] | None = None


class EmbedRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    input: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]


class NamedRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None


#: what Ollama answers at its root, which apps ask to see whether it is up
RUNNING = "Ollama is running"


async def running() -> PlainTextResponse:
    return PlainTextResponse(RUNNING)


#: the root's routes, outside /api (app.py mounts them)
root = APIRouter()
root.add_api_route("/", running, methods=["GET", "HEAD"])


class LegacyEmbedRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    prompt: StrictStr


@router.get("/version")
async def version() -> dict:
    return {"version": OLLAMA_VERSION, "edgellm": __version__}


@router.get("/tags")
async def tags(request: Request) -> dict:
    pool = request.app.state.pool
    models = await asyncio.to_thread(lambda: [_model(pool.describe(name)) for name in pool.names()])
    return {"models": models}


@router.post("/show")
async def show(body: NamedRequest, request: Request) -> dict:
    pool = request.app.state.pool
    model = await asyncio.to_thread(pool.describe, body.model or body.name)
    header = model.header
    template = pool.template.source if pool.template else header.chat_template or ""
    info = {"general.architecture": header.architecture, "general.parameter_count": header.parameter_count,
            f"{header.architecture}.context_length": header.context_length}
    return {"modelfile": "", "parameters": "", "template": template, "details": _details(header),
            "model_info": info, "capabilities": _capabilities(template), "modified_at": _modified(model)}


def _capabilities(template: str) -> list[str]:
    """What a model served here can do, as Ollama names it: every model completes, calls tools (in
    its template's format, or the generic one) and embeds; a template that opens a ``<think>``
    block thinks."""
    return ["completion", "tools", "embedding", *(["thinking"] if "<think>" in template else [])]


@router.get("/ps")
async def ps(request: Request) -> dict:
    pool = request.app.state.pool
    return {"models": [{**_model_of(s.name, s.header, s.plan.memory.total), "size_vram": s.plan.memory.gpu,
                        "context_length": s.engine.n_ctx, "expires_at": _expires(s.last_used, pool.keep_alive)}
                       for s in pool.loaded()]}


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request) -> dict:
    started = time.perf_counter_ns()
    served = await served_model(request, body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    vectors = await asyncio.to_thread(served.engine.embed, texts)
    return {"model": served.name, "embeddings": [v for v, _ in vectors], "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0, "prompt_eval_count": sum(n for _, n in vectors)}


@router.post("/embeddings")
async def embeddings(body: LegacyEmbedRequest, request: Request) -> dict:
    """Ollama's older embeddings route: one prompt, one vector."""
    served = await served_model(request, body.model)
    ((vector, _),) = await asyncio.to_thread(served.engine.embed, [body.prompt])
    return {"embedding": vector}


@router.post("/chat")
async def chat(body: ChatRequest, request: Request):
    turns = tuple(_turn(m) for m in body.messages)
    if not turns:  # Ollama loads (or with keep_alive 0 unloads) the model for an empty chat, and is done
        return await _load_only(request, body, "message", {"role": "assistant", "content": ""})
    served = await served_model(request, body.model)
    tools = tuple(Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools or ())
    return await _answer(request, served, _spec(body, turns=turns, tools=tools), body, "message")


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request):
    if not body.prompt and not body.raw:  # likewise for an empty prompt
        return await _load_only(request, body, "response", "")
    served = await served_model(request, body.model)
    if body.images:
        raise UsageError("the served models read text only; this request has images")
    if body.raw:
        prompt = await asyncio.to_thread(served.native.tokenize, body.prompt, True)
        spec = _spec(body, prompt=tuple(prompt), reasoning=False)
    else:
        turns = ([Message("system", body.system)] if body.system else []) + [Message("user", body.prompt)]
        spec = _spec(body, turns=tuple(turns))
    return await _answer(request, served, spec, body, "response")


async def _load_only(request: Request, body: _Generating, field: str, empty: Any) -> dict:
    """Ollama's answer to a request with nothing to answer: the model loaded, or unloaded when
    ``keep_alive`` is 0."""
    if body.keep_alive in (0, "0", "0s", "0m"):
        await asyncio.to_thread(request.app.state.pool.unload, body.model)
        reason, name = "unload", request.app.state.pool.describe(body.model).name
    else:
        reason, name = "load", (await served_model(request, body.model)).name
    return {"model": name, "created_at": _iso(time.time()), field: empty, "done": True, "done_reason": reason}


def _turn(message: OllamaMessage) -> Message:
    if message.images:
        raise UsageError("the served models read text only; a message has images")
    calls = tuple(ToolCall.new(c.function.name, c.function.arguments) for c in message.tool_calls or ())
    return Message(message.role, message.content, calls)


def _spec(body: _Generating, **parts: Any) -> GenerationSpec:
    """An Ollama request in no API's words: ``format`` shapes the answer, tools are the model's
    to call (Ollama has no tool_choice)."""
    options = body.options
    predict = options.num_predict if options.num_predict not in (None, -2) else -1
    fmt = body.format
    return GenerationSpec(
        **parts, json_answer=fmt is not None, json_schema=fmt if isinstance(fmt, dict) else None,
        max_tokens=predict if predict > 0 else None, stop=tuple(options.stop or ()),
        sampling={k: v for k, v in options.model_dump(exclude={"num_predict", "stop"}).items() if v is not None},
        fields={"format": "format", "tools": "tools", "messages": "messages"})


async def _answer(request: Request, served, spec: GenerationSpec, body: _Generating, field: str):
    ready = await prepared(served, spec, request.app.state.config.defaults)
    reply = _Reply(served.name, len(ready.prompt), field, ready.calls)
    paced = Paced(ready.request(), served)
    if not body.stream:
        got = await paced.gathered()
        text, thinking = joined(got)
        return reply.final(text, got[-1], thinking)
    first = await paced.first()  # errors before the first token still become an HTTP error
    return EventStream(reply.lines(first, paced), media_type="application/x-ndjson")


class _Reply:
    """One answer as Ollama writes it: a line per piece, then the last with counts and durations."""

    def __init__(self, model: str, n_prompt: int, field: str, calls: CallRules | None) -> None:
        self.model, self.n_prompt, self.field, self.calls = model, n_prompt, field, calls
        self.started = time.perf_counter_ns()

    def _piece(self, text: str) -> dict:
        return {"role": "assistant", "content": text} if self.field == "message" else text

    def line(self, text: str, thinking: str = "") -> dict:
        piece = self._piece(text)
        if thinking:  # a reasoning model's <think> block, as Ollama reports it
            piece = {**piece, "thinking": thinking} if self.field == "message" else piece
        line = {"model": self.model, "created_at": _iso(time.time()), self.field: piece, "done": False}
        return {**line, "thinking": thinking} if thinking and self.field == "response" else line

    def final(self, text: str, last: Chunk, thinking: str = "", calls: list[ToolCall] | None = None) -> dict:
        """The last line (whole: ``text`` is the answer, its calls read from it; streamed: ``text``
        is what is left to send, and ``calls`` the answer's calls)."""
        t = last.timings
        if calls is None and self.calls is not None and self.field == "message":
            text, calls = self.calls.split(text)
        piece = self._piece(text)
        if calls:
            piece = {**piece, "tool_calls": [
                {"function": {"index": i, "name": c.name, "arguments": json.loads(c.arguments)}}
                for i, c in enumerate(calls)]}
        if thinking and self.field == "message":
            piece = {**piece, "thinking": thinking}
        return {"model": self.model, "created_at": _iso(time.time()), self.field: piece, "done": True,
                "done_reason": "length" if last.finish_reason == "length" else "stop",
                "total_duration": time.perf_counter_ns() - self.started, "load_duration": 0,
                "prompt_eval_count": t.prompt_tokens - t.cached_tokens, "prompt_eval_duration": int(t.prompt_ms * 1e6),
                "eval_count": t.generated_tokens, "eval_duration": int(t.generate_ms * 1e6)}

    async def lines(self, first: Chunk | Reading, paced: Paced) -> AsyncIterator[bytes]:
        """Each piece as it comes, the calls of a tool-calling answer in the last line."""
        try:
            async for item in answer_items(first, paced, self.calls if self.field == "message" else None):
                if isinstance(item, Thought):
                    yield _ndjson(self.line("", item.text))
                elif isinstance(item, Content):
                    yield _ndjson(self.line(item.text))
                elif isinstance(item, Ended):
                    yield _ndjson(self.final("", item.last, calls=item.calls))
        except EdgeLLMError as exc:  # too late for an HTTP status: an error line, as Ollama sends
            yield _ndjson({"error": str(exc)})
        finally:
            await paced.aclose()


def _ndjson(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def _expires(last_used: float, keep_alive: float) -> str:
    """When the pool unloads an idle model (``last_used`` on the monotonic clock; -1: never)."""
    if keep_alive < 0:
        return "9999-12-31T23:59:59Z"
    return _iso(time.time() + max(keep_alive - (time.monotonic() - last_used), 0))


def _details(header) -> dict:
    return {"format": "gguf", "family": header.architecture, "families": [header.architecture],
            "parameter_size": format_params(header.parameter_count), "quantization_level": header.quantization}


def _modified(model) -> str:
    return _iso(model.path.stat().st_mtime)


def _model(model) -> dict:
    return {**_model_of(model.name, model.header, model.header.file_size), "modified_at": _modified(model)}


def _model_of(name: str, header, size: int) -> dict:
    return {"name": name, "model": name, "size": size, "digest": "", "details": _details(header)}
