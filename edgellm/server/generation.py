"""From a dialect's GenerationSpec to the engine and back: the spec prepared for the served model
(runtime/request.py decides what it means), its Chunks handed to the event loop, and a streamed
answer as the items every dialect writes in its own events (``answer_items``): thoughts, text,
tool calls as they are written, keep-alive beats while a long prompt is read, and the end."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from fastapi import Request

from edgellm.errors import ToolCallError, UsageError, brief
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.request import CallRules, GenerationSpec, Prepared, prepare
from edgellm.runtime.tools import ToolCall
from edgellm.runtime.toolstream import CallArguments, CallBegun, CallStream, Content, streams
from edgellm.server.models import Served

#: how long a streamed answer waits for its first token before its response starts anyway, and
#: how often a beat goes out after that while the prompt is still read: a 20k-token prompt takes
#: minutes on a small CPU, and clients give up on a response whose headers or bytes do not come
#: (Node's fetch after 300 s without headers, which Claude Code and Codex use)
FIRST_WAIT = 2.0
BEAT_EVERY = 5.0


async def served_model(request: Request, name: str | None) -> Served:
    """The served model a request names, loaded if it is not (in a worker thread: a load takes a
    while, and the event loop goes on answering others)."""
    return await asyncio.to_thread(request.app.state.pool.get, name)


async def prepared(served: Served, spec: GenerationSpec, defaults: SamplingOptions) -> Prepared:
    """A dialect's spec made ready for the served model (in a worker thread: a long conversation
    takes a while to render and tokenize)."""
    return await asyncio.to_thread(prepare, spec, served.model, defaults)


def text_prompts(served: Served, prompt: str | list) -> list[list[int]]:
    """A completion request's prompts: a text, a list of texts (a choice each), token ids (checked)."""
    if isinstance(prompt, str):
        return [served.native.tokenize(prompt, True)]
    if prompt and isinstance(prompt[0], int):
        n_vocab = served.native.n_vocab
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary of {n_vocab} tokens")
        return [list(prompt)]
    if not prompt:
        raise UsageError("the prompt list is empty")
    return [served.native.tokenize(text, add_special=True) for text in prompt]


def openai_sampling(body: Any) -> dict[str, Any]:
    """The sampling fields an OpenAI body sets (chat and text completions share them)."""
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "min_p": body.min_p,
             "repeat_penalty": body.repeat_penalty, "presence_penalty": body.presence_penalty,
             "frequency_penalty": body.frequency_penalty, "ignore_eos": body.ignore_eos or None,
             "seed": body.seed, "logit_bias": _logit_bias(body.logit_bias) or None}
    return {name: value for name, value in given.items() if value is not None}


def choices(ready: Prepared, n: int, seed: int | None) -> list[GenerationRequest]:
    """``n`` answers to one prepared request (OpenAI's ``n``), decoded side by side; a ``seed`` the
    request gave moves on by one for each answer."""
    gens = [ready.request() for _ in range(n)]
    if seed is not None:
        for i, gen in enumerate(gens[1:], 1):
            gen.sampling = replace(gen.sampling, seed=seed + i)
    return gens


class Mailbox:
    """Hands the engine thread's Chunks to the event loop, waking the loop once for all that
    arrived since it last looked instead of once per token per stream: one step of the engine
    emits a token for every stream, and each wake-up costs the loop a system call and a turn.

    Chunks wait for the engine's ``flush``, which comes as it starts a decode: the loop's Python
    then runs while llama.cpp computes, not between two decodes, where it would hold the GIL the
    engine needs. An answer's last chunk (or its error) wakes the loop at once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []
        self._waking = False  # a wake-up is on its way

    def post(self, queue: asyncio.Queue, item: Chunk | BaseException) -> None:
        with self._lock:
            self._pending.append((queue, item))
        if isinstance(item, BaseException) or item.finish_reason:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            if self._waking or not self._pending:
                return
            self._waking = True
        self._loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            pending, self._pending, self._waking = self._pending, [], False
        for queue, item in pending:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def _logit_bias(given: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``{"token id": bias}``; ids outside the vocabulary are refused by the engine."""
    out = []
    for key, bias in (given or {}).items():
        if not key.lstrip("-").isdigit():
            raise UsageError(f"logit_bias keys are token ids, got {brief(key)}")
        out.append((int(key), float(bias)))
    return tuple(out)


async def chunks(gen: GenerationRequest, served: Served) -> AsyncIterator[Chunk]:
    """Submit to the engine and yield its Chunks; leaving early (a client gone) frees the slot."""
    loop = asyncio.get_running_loop()
    mailbox = _mailboxes.get(loop) or _mailboxes.setdefault(loop, Mailbox(loop))
    queue: asyncio.Queue = asyncio.Queue()
    gen.emit = lambda item: mailbox.post(queue, item)
    gen.flush = mailbox.flush
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


@dataclass(frozen=True)
class Reading:
    """No token yet: the prompt is being read (``read`` of its ``total`` tokens so far)."""

    read: int
    total: int

    def __str__(self) -> str:
        return f"reading the prompt: {self.read}/{self.total} tokens"

    def comment(self) -> bytes:
        """As an SSE comment, which every client skips: it keeps the response alive and says how far."""
        return f": {self}\n\n".encode()


class Paced:
    """An answer's Chunks, and a ``Reading`` whenever none has come for a while, so a stream can
    start before its first token and stay alive while a long prompt is read."""

    def __init__(self, gen: GenerationRequest, served: Served) -> None:
        self.gen = gen
        self._chunks = chunks(gen, served)
        self._next: asyncio.Future | None = None

    async def next(self, wait: float = BEAT_EVERY) -> Chunk | Reading:
        """The next Chunk, or a Reading after ``wait`` seconds without one (errors are raised)."""
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._chunks))
        done, _ = await asyncio.wait({self._next}, timeout=wait)
        if not done:
            return Reading(self.gen.read, len(self.gen.prompt))
        task, self._next = self._next, None
        return task.result()

    async def first(self) -> Chunk | Reading:
        """The first Chunk if it comes within FIRST_WAIT (its errors are still an HTTP status)."""
        return await self.next(FIRST_WAIT)

    async def gathered(self) -> list[Chunk]:
        """The whole answer (a request that is not streamed); its slot is freed however this ends."""
        try:
            return [chunk async for chunk in self._chunks]
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Stop reading: the engine frees the answer's slot."""
        if self._next is not None:
            self._next.cancel()
            try:
                await self._next
            except (asyncio.CancelledError, Exception):
                pass
            self._next = None
        await self._chunks.aclose()


@dataclass(frozen=True)
class Thought:
    """A reasoning model's thinking, split from its answer."""

    text: str


@dataclass(frozen=True)
class Ended:
    """The answer is complete: its last Chunk, its content and its calls (the ids as streamed)."""

    last: Chunk
    content: str
    calls: list[ToolCall]
    unfinished: bool = False  # a call was streamed that the length cut short (not among ``calls``)


Item = Reading | Thought | Content | CallBegun | CallArguments | Ended


async def answer_items(first: Chunk | Reading, paced: Paced, rules: CallRules | None) -> AsyncIterator[Item]:
    """A streamed answer as every dialect writes it: beats while the prompt is read, thoughts and
    text as they come, tool calls as they are written where the format allows (else whole at the
    end, with the text held until then), and ``Ended``. Errors are raised: a dialect makes them an
    error event. The calls streamed are those the whole answer's checks pass, or a ToolCallError is
    raised (unless the answer was cut by its length, as OpenAI's are)."""
    reader = CallStream(rules) if rules is not None and streams(rules) else None
    pieces: list[str] = []
    item = first
    while True:
        if isinstance(item, Reading):
            yield item
        else:
            if item.reasoning:
                yield Thought(item.reasoning)
            if item.text:
                pieces.append(item.text)
                if rules is None:
                    yield Content(item.text)
                elif reader is not None:
                    for event in reader.feed(item.text):
                        yield event
            if item.finish_reason:
                break
        item = await paced.next()
    last, text = item, "".join(pieces)
    if rules is None:
        yield Ended(last, text, [])
        return
    if reader is None:
        content, calls = rules.split(text)
        if content:
            yield Content(content)
        for i, call in enumerate(calls):
            yield CallBegun(i, call.id, call.name)
            yield CallArguments(i, call.arguments)
        yield Ended(last, content, calls)
        return
    for event in reader.close():
        yield event
    content, calls, agreed = reader.settle(cut=last.finish_reason == "length")
    if not agreed:
        raise ToolCallError("the tool calls the model wrote did not pass the checks once it had finished")
    rest = reader.unsent_content(content)
    if rest:
        yield Content(rest)
    yield Ended(last, content, calls, len(reader.calls) > len(calls))
