"""OpenAI's API routes: models, chat completions, completions, embeddings. Each handler reads the
model pool and the server's settings from ``app.state``."""

from __future__ import annotations

import asyncio
import base64
import struct
from typing import Any

from fastapi import APIRouter, Request

from edgellm.errors import ModelNotFoundError, UsageError, brief
from edgellm.server.encoders import ChatEncoder, TextEncoder, respond
from edgellm.server.generation import chat_prompt, chunks, generation, grammar_for, text_prompts, tools_for
from edgellm.server.schemas import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, EmbeddingRequest

#: mounted at /v1 and at the root, as OpenAI clients configured with either base URL call it
router = APIRouter()


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
    served = await asyncio.to_thread(request.app.state.pool.get, body.model)
    fmt = served.template.tool_format
    tools, call_rules, triggers = tools_for(body, fmt)
    prompt = await asyncio.to_thread(chat_prompt, served, body.messages, tools)
    top = (body.top_logprobs or 0) if body.logprobs else None
    forced = None if triggers else call_rules
    grammar = forced or body.grammar or grammar_for(body.response_format) or call_rules
    gens = [generation(served, body, prompt, body.max_completion_tokens or body.max_tokens,
                       request.app.state.config.defaults, grammar, top, reasoning=body.reasoning_format != "none",
                       choice=i, triggers=triggers if grammar is call_rules else ()) for i in range(body.n)]
    encoder = ChatEncoder(served.name, len(prompt), top is not None, fmt if tools else None)
    return await respond(encoder, [chunks(gen, served) for gen in gens], body.stream, _include_usage(body))


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request):
    served = await asyncio.to_thread(request.app.state.pool.get, body.model)
    prompts = await asyncio.to_thread(text_prompts, served, body.prompt)
    if len(prompts) * body.n > MAX_CHOICES:
        raise UsageError(f"{len(prompts)} prompts times n={body.n} is more than {MAX_CHOICES} answers in one request")
    gens = [generation(served, body, prompt, body.max_tokens, request.app.state.config.defaults, None, body.logprobs,
                       choice=i) for prompt in prompts for i in range(body.n)]
    encoder = TextEncoder(served.name, sum(map(len, prompts)), body.logprobs is not None)
    return await respond(encoder, [chunks(gen, served) for gen in gens], body.stream, _include_usage(body))


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> dict:
    served = await asyncio.to_thread(request.app.state.pool.get, body.model)
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
