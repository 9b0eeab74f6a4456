"""From a dialect's GenerationSpec to the engine and back: the spec prepared for the served model
(runtime/request.py decides what it means), its Chunks handed to the event loop."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import Request

from edgellm.errors import UsageError, brief
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.request import GenerationSpec, Prepared, prepare
from edgellm.server.models import Served


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
