"""OpenAI's API routes: models, chat completions, completions, embeddings. Each handler reads the
model pool and the server's settings from ``app.state``."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from fastapi import APIRouter, Request

from edgellm.errors import ModelNotFoundError, UsageError, brief
from edgellm.runtime.request import GenerationSpec
from edgellm.runtime.templates import Message
from edgellm.runtime.tools import Tool, ToolCall
from edgellm.server.bodies import openai_error
from edgellm.server.encoders import ChatEncoder, TextEncoder, respond
from edgellm.server.generation import Paced, choices, openai_sampling, prepared, served_model, text_prompts
from edgellm.server.schemas import (
    MAX_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    NamedToolChoice,
)

#: mounted at /v1 and at the root, as OpenAI clients configured with either base URL call it
router = APIRouter()
#: the error bodies this API's clients read
ERRORS = openai_error


def _model_object(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "edgellm"}


@router.get("/models")
async def models(request: Request) -> dict:
    names = await asyncio.to_thread(request.app.state.pool.names)
    return {"object": "list", "data": [_model_object(n) for n in names]}


@router.get("/models/{name:path}")
async def model(name: str, request: Request) -> dict:
    names = await asyncio.to_thread(request.app.state.pool.names)
    if name not in names:
        raise ModelNotFoundError(f"model {brief(name)} is not served here", hint="GET /v1/models lists them")
    return _model_object(name)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    served = await served_model(request, body.model)
    ready = await prepared(served, chat_spec(body), request.app.state.config.defaults)
    gens = choices(ready, body.n, body.seed)
    encoder = ChatEncoder(served.name, len(ready.prompt), body.logprobs, ready.calls)
    return await respond(encoder, [Paced(gen, served) for gen in gens], body.stream, _include_usage(body))


def chat_spec(body: ChatCompletionRequest) -> GenerationSpec:
    """A chat completion in no API's words."""
    turns = tuple(Message("system" if m.role == "developer" else m.role, m.text(),
                          tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls or ()),
                          m.tool_call_id) for m in body.messages)
    choice, name = body.tool_choice or "auto", None
    if isinstance(choice, NamedToolChoice):
        choice, name = "function", choice.function.name
    fmt = body.response_format
    shaped = fmt is not None and fmt.type != "text"
    if shaped and fmt.type == "json_schema" and (fmt.json_schema is None or not fmt.json_schema.schema_):
        raise UsageError("response_format json_schema needs a schema")
    return GenerationSpec(
        turns, tools=tuple(Tool(t.function.name, t.function.description, t.function.parameters)
                           for t in body.tools or ()),
        tool_choice=choice, tool_name=name, parallel_tool_calls=body.parallel_tool_calls, json_answer=shaped,
        json_schema=fmt.json_schema.schema_ if shaped and fmt.type == "json_schema" else None, grammar=body.grammar,
        max_tokens=body.max_completion_tokens or body.max_tokens, stop=body.stops(),
        sampling={**openai_sampling(body), "logprobs": (body.top_logprobs or 0) if body.logprobs else None},
        reasoning=body.reasoning_format != "none",
        fields={"format": "response_format.json_schema.schema", "tools": "tools", "grammar": "grammar",
                "tool_choice": "tool_choice", "messages": "messages"},
    )


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    served = await served_model(request, body.model)
    prompts = await asyncio.to_thread(text_prompts, served, body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise UsageError(f"{len(prompts)} prompts times n={body.n} is more than {MAX_CHOICES} answers in one request")
    defaults = request.app.state.config.defaults
    gens = []
    for prompt in prompts:
        spec = GenerationSpec(prompt=tuple(prompt), max_tokens=body.max_tokens, stop=body.stops(),
                              sampling={**openai_sampling(body), "logprobs": body.logprobs}, reasoning=False)
        gens += choices(await prepared(served, spec, defaults), body.n, body.seed)
    encoder = TextEncoder(served.name, sum(map(len, prompts)), body.logprobs is not None)
    return await respond(encoder, [Paced(gen, served) for gen in gens], body.stream, _include_usage(body))


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    served = await served_model(request, body.model)
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


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
