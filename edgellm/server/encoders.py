"""Chunks to OpenAI's two answer shapes: chat completions and text completions, whole or streamed.

One ``respond()`` gathers or streams the Chunks; an encoder says what each shape's body, stream
event and log-probabilities look like.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from edgellm.errors import EdgeLLMError
from edgellm.runtime.chunks import Chunk, TokenLogprob, joined
from edgellm.runtime.request import CallRules
from edgellm.runtime.tools import ToolCall
from edgellm.server.bodies import error_payload
from edgellm.server.streaming import EventStream


class Encoder:
    """What every answer carries: its id, creation time, model and token usage."""

    prefix = ""
    object = ""
    chunk_object = ""

    #: the answer is read for tool calls once whole (streamed as one piece then), or None
    calls: CallRules | None = None

    def __init__(self, model: str, n_prompt: int, logprobs: bool) -> None:
        self.id = self.prefix + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model
        self.n_prompt = n_prompt
        self.logprobs = logprobs
        # the event of a plain token, which is nearly every event, split around its text
        head = json.dumps(self.event(Chunk("\0"), False), ensure_ascii=False)
        self._around = tuple(part.encode() for part in head.split(json.dumps("\0")))

    def sse(self, chunk: Chunk, first: bool, index: int = 0) -> bytes:
        """One server-sent event of the stream. A plain token's is the same JSON as event() gives,
        put together around the token's text, since it is written for every token of every stream."""
        if (first or index or chunk.finish_reason or chunk.logprobs is not None or not chunk.text or chunk.reasoning
                or len(self._around) != 2):
            return _sse(self.event(chunk, first, index))
        return b"data: " + self._around[0] + json.dumps(chunk.text, ensure_ascii=False).encode() + self._around[1] + b"\n\n"

    def usage(self, *lasts: Chunk) -> dict:
        done = sum(last.timings.generated_tokens for last in lasts)
        return {"prompt_tokens": self.n_prompt, "completion_tokens": done, "total_tokens": self.n_prompt + done}

    def envelope(self, obj: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def body(self, answers: list[Gathered]) -> dict:
        """The whole response: one choice per answer (``n``, or a list of prompts)."""
        choices = [self.choice(i, a) for i, a in enumerate(answers)]
        lasts = [a.last for a in answers]
        return {**self.envelope(self.object, choices), "usage": self.usage(*lasts), "timings": lasts[0].timings.as_dict()}

    def choice(self, index: int, answer: Gathered) -> dict:
        return {"index": index, "finish_reason": answer.last.finish_reason, **self.whole(answer.text, answer.reasoning),
                "logprobs": self.logprob_block(answer.entries) if self.logprobs else None}

    def event(self, chunk: Chunk, first: bool, index: int = 0) -> dict:
        choice = {"index": index, "finish_reason": chunk.finish_reason, **self.piece(chunk, first),
                  "logprobs": self.logprob_block([chunk.logprobs]) if self.logprobs and chunk.logprobs else None}
        return self.envelope(self.chunk_object, [choice])

    def whole(self, text: str, reasoning: str) -> dict:
        raise NotImplementedError

    def piece(self, chunk: Chunk, first: bool) -> dict:
        raise NotImplementedError

    def logprob_block(self, entries: list[TokenLogprob]) -> dict:
        raise NotImplementedError


class ChatEncoder(Encoder):
    prefix, object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, n_prompt: int, logprobs: bool, calls: CallRules | None = None) -> None:
        super().__init__(model, n_prompt, logprobs)
        self.calls = calls

    def choice(self, index: int, answer: Gathered) -> dict:
        choice = super().choice(index, answer)
        if self.calls is not None:
            content, calls = self.calls.split(answer.text)
            if calls:
                choice["message"].update(content=content or None, tool_calls=[_call(c) for c in calls])
                choice["finish_reason"] = "tool_calls"
        return choice

    def whole_events(self, body: dict) -> list[bytes]:
        """Whole answers as the stream of a tool-calling request: each one's text and calls in one
        delta, then its finish reason (clients assemble tool calls from their deltas by index)."""
        events = []
        for choice in body["choices"]:
            message = choice["message"]
            delta: dict[str, Any] = {"role": "assistant", "content": message["content"]}
            if message.get("reasoning_content"):
                delta["reasoning_content"] = message["reasoning_content"]
            if message.get("tool_calls"):
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
            first = {"index": choice["index"], "finish_reason": None, "delta": delta, "logprobs": choice["logprobs"]}
            last = {"index": choice["index"], "finish_reason": choice["finish_reason"], "delta": {}, "logprobs": None}
            events += [_sse(self.envelope(self.chunk_object, [first])), _sse(self.envelope(self.chunk_object, [last]))]
        return events

    def whole(self, text: str, reasoning: str) -> dict:
        message = {"role": "assistant", "content": text}
        if reasoning:
            message["reasoning_content"] = reasoning  # llama-server's and DeepSeek's field
        return {"message": message}

    def piece(self, chunk: Chunk, first: bool) -> dict:
        delta: dict[str, Any] = {"role": "assistant", "content": chunk.text} if first else (
            {"content": chunk.text} if chunk.text else {})
        if chunk.reasoning:
            delta["reasoning_content"] = chunk.reasoning
        return {"delta": delta}

    def logprob_block(self, entries: list[TokenLogprob]) -> dict:
        return {"content": [{
            "token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode()),
            "top_logprobs": [{"token": t, "logprob": p, "bytes": list(t.encode())} for _, t, p in lp.top],
        } for lp in entries]}


class TextEncoder(Encoder):
    prefix, object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def whole(self, text: str, reasoning: str) -> dict:
        return {"text": text}

    def piece(self, chunk: Chunk, first: bool) -> dict:
        return {"text": chunk.text}

    def logprob_block(self, entries: list[TokenLogprob]) -> dict:
        return {
            "tokens": [lp.text for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{t: p for _, t, p in lp.top} for lp in entries],
            "text_offset": [],
        }


@dataclass(frozen=True)
class Gathered:
    """One answer, whole."""

    text: str
    entries: list[TokenLogprob]
    last: Chunk
    reasoning: str


async def gather(chunks: AsyncIterator[Chunk]) -> Gathered:
    got = [chunk async for chunk in chunks]
    text, reasoning = joined(got)
    return Gathered(text, [c.logprobs for c in got if c.logprobs], got[-1], reasoning)


async def respond(encoder: Encoder, streams: list[AsyncIterator[Chunk]], stream: bool, include_usage: bool = False):
    """The whole answers as one body, or a server-sent event stream of them (``streams``: one
    per choice, answered side by side by the engine)."""
    if not stream or encoder.calls is not None:
        try:
            body = encoder.body(list(await asyncio.gather(*(gather(s) for s in streams))))
        finally:
            for s in streams:
                await s.aclose()
        if not stream:
            return body
        usage = [_sse({**encoder.envelope(encoder.chunk_object, []), "usage": body["usage"]})] if include_usage else []
        events = [*encoder.whole_events(body), *usage, b"data: [DONE]\n\n"]
        return EventStream(iter(events), media_type="text/event-stream")
    if len(streams) > 1:
        return EventStream(_merged(encoder, streams, include_usage), media_type="text/event-stream")
    first = await anext(streams[0])  # errors before the first token still become an HTTP error
    return EventStream(_events(encoder, first, streams[0], include_usage), media_type="text/event-stream")


async def _merged(encoder: Encoder, streams: list[AsyncIterator[Chunk]], include_usage: bool) -> AsyncIterator[bytes]:
    """Several answers' events interleaved as their tokens come, each choice by its index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, chunks: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in chunks:
                await queue.put((index, chunk))
        except EdgeLLMError as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    started, lasts = set(), {}
    try:
        while len(lasts) < len(streams):
            index, item = await queue.get()
            if isinstance(item, EdgeLLMError):  # too late for an HTTP status: an error event
                yield _sse(error_payload(str(item), item.code, "server_error"))
                return
            yield encoder.sse(item, index not in started, index)
            started.add(index)
            if item.finish_reason:
                lasts[index] = item
        if include_usage:
            yield _sse({**encoder.envelope(encoder.chunk_object, []), "usage": encoder.usage(*lasts.values())})
        yield b"data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
        for s in streams:
            await s.aclose()


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _events(encoder: Encoder, chunk: Chunk, chunks: AsyncIterator[Chunk], include_usage: bool
                  ) -> AsyncIterator[bytes]:
    first = True
    try:  # a client that goes away cancels this generator; closing `chunks` frees its slot
        while True:
            yield encoder.sse(chunk, first)
            first = False
            if chunk.finish_reason:
                if include_usage:
                    yield _sse({**encoder.envelope(encoder.chunk_object, []), "usage": encoder.usage(chunk)})
                yield b"data: [DONE]\n\n"
                return
            try:
                chunk = await anext(chunks)
            except EdgeLLMError as exc:  # too late for an HTTP status: an error event, as OpenAI sends
                yield _sse(error_payload(str(exc), exc.code, "server_error"))
                return
    finally:
        await chunks.aclose()


def _call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
