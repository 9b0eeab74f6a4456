"""Chunks to OpenAI's two answer shapes: chat completions and text completions, whole or streamed.

One ``respond()`` gathers or streams the Chunks; an encoder says what each shape's body, stream
event and log-probabilities look like. A streamed answer whose prompt takes a while to read starts
at once with SSE comments saying how far the reading has got, which every client skips.
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
from edgellm.runtime.toolstream import CallArguments, CallBegun, Content
from edgellm.server.bodies import error_payload
from edgellm.server.generation import Ended, Paced, Reading, Thought, answer_items
from edgellm.server.streaming import EventStream


class Encoder:
    """What every answer carries: its id, creation time, model and token usage."""

    prefix = ""
    object = ""
    chunk_object = ""

    #: the rules an answer's tool calls are read with, or None
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

    async def item_events(self, first: Chunk | Reading, paced: Paced, include_usage: bool
                          ) -> AsyncIterator[bytes]:
        """A tool-calling answer's stream: text as it comes, each call's name once known and its
        arguments as they are written (clients join a call's deltas by its index)."""
        started = False
        try:
            async for item in answer_items(first, paced, self.calls):
                if isinstance(item, Reading):
                    yield item.comment()
                    continue
                if isinstance(item, Ended):
                    finish = "tool_calls" if item.calls and not item.unfinished else item.last.finish_reason
                    last = {"index": 0, "finish_reason": finish, "delta": {}, "logprobs": None}
                    yield _sse(self.envelope(self.chunk_object, [last]))
                    if include_usage:
                        yield _sse({**self.envelope(self.chunk_object, []), "usage": self.usage(item.last)})
                    break
                delta: dict[str, Any] = {} if started else {"role": "assistant"}
                started = True
                if isinstance(item, Thought):
                    delta["reasoning_content"] = item.text
                elif isinstance(item, Content):
                    delta["content"] = item.text
                elif isinstance(item, CallBegun):
                    delta["tool_calls"] = [{"index": item.index, "id": item.id, "type": "function",
                                            "function": {"name": item.name, "arguments": ""}}]
                elif isinstance(item, CallArguments):
                    delta["tool_calls"] = [{"index": item.index, "function": {"arguments": item.text}}]
                choice = {"index": 0, "finish_reason": None, "delta": delta, "logprobs": None}
                yield _sse(self.envelope(self.chunk_object, [choice]))
            yield b"data: [DONE]\n\n"
        except EdgeLLMError as exc:  # too late for an HTTP status: an error event, as OpenAI sends
            yield _sse(error_payload(str(exc), exc.code, "server_error"))
        finally:
            await paced.aclose()

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


async def gather(paced: Paced) -> Gathered:
    got = await paced.gathered()
    text, reasoning = joined(got)
    return Gathered(text, [c.logprobs for c in got if c.logprobs], got[-1], reasoning)


async def respond(encoder: Encoder, answers: list[Paced], stream: bool, include_usage: bool = False):
    """The whole answers as one body, or a server-sent event stream of them (``answers``: one per
    choice, answered side by side by the engine)."""
    if not stream or (encoder.calls is not None and (len(answers) > 1 or encoder.logprobs)):
        try:
            body = encoder.body(list(await asyncio.gather(*(gather(a) for a in answers))))
        finally:
            for a in answers:
                await a.aclose()
        if not stream:
            return body
        usage = [_sse({**encoder.envelope(encoder.chunk_object, []), "usage": body["usage"]})] if include_usage else []
        events = [*encoder.whole_events(body), *usage, b"data: [DONE]\n\n"]
        return EventStream(iter(events), media_type="text/event-stream")
    if len(answers) > 1:
        return EventStream(_merged(encoder, answers, include_usage), media_type="text/event-stream")
    first = await answers[0].first()  # errors before the first token still become an HTTP error
    if encoder.calls is not None:
        events = encoder.item_events(first, answers[0], include_usage)
    else:
        events = _events(encoder, first, answers[0], include_usage)
    return EventStream(events, media_type="text/event-stream")


async def _merged(encoder: Encoder, answers: list[Paced], include_usage: bool) -> AsyncIterator[bytes]:
    """Several answers' events interleaved as their tokens come, each choice by its index."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, paced: Paced) -> None:
        try:
            while True:
                item = await paced.next()
                await queue.put((index, item))
                if isinstance(item, Chunk) and item.finish_reason:
                    return
        except EdgeLLMError as exc:
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, a)) for i, a in enumerate(answers)]
    started, lasts = set(), {}
    try:
        while len(lasts) < len(answers):
            index, item = await queue.get()
            if isinstance(item, EdgeLLMError):  # too late for an HTTP status: an error event
                yield _sse(error_payload(str(item), item.code, "server_error"))
                return
            if isinstance(item, Reading):
                if index == 0:
                    yield item.comment()
                continue
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
        for a in answers:
            await a.aclose()


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _events(encoder: Encoder, item: Chunk | Reading, paced: Paced, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    first = True
    try:  # a client that goes away cancels this generator; closing `paced` frees its slot
        while True:
            if isinstance(item, Reading):
                yield item.comment()
            else:
                yield encoder.sse(item, first)
                first = False
                if item.finish_reason:
                    if include_usage:
                        usage = encoder.usage(item)
                        yield _sse({**encoder.envelope(encoder.chunk_object, []), "usage": usage})
                    yield b"data: [DONE]\n\n"
                    return
            try:
                item = await paced.next()
            except EdgeLLMError as exc:  # too late for an HTTP status: an error event, as OpenAI sends
                yield _sse(error_payload(str(exc), exc.code, "server_error"))
                return
    finally:
        await paced.aclose()


def _call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
