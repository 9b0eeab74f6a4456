"""From an API request to the engine and back: the prompt, the sampling, and the Chunks."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from edgellm.errors import UsageError, brief
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.grammar import json_grammar
from edgellm.runtime.templates import Message
from edgellm.runtime.text import opens_thinking
from edgellm.runtime.tools import Tool, ToolCall, ToolFormat, check_tools, tool_grammar
from edgellm.server.models import Served


def chat_prompt(served: Served, messages: list, tools: list[Tool] = ()) -> list[int]:
    """The prompt tokens of a conversation through the model's template, with the tools offered
    and the earlier calls and their results (in a worker thread: a long conversation takes a
    while to render and tokenize)."""
    turns = [Message("system" if m.role == "developer" else m.role, m.text(),
                     tuple(ToolCall(c.function.name, c.function.arguments, c.id) for c in m.tool_calls or ()),
                     m.tool_call_id) for m in messages]
    return render_prompt(served, turns, tools)


def render_prompt(served: Served, turns: list[Message], tools: Sequence[Tool] = ()) -> list[int]:
    """The prompt tokens of a conversation through the model's template, whichever API it came by."""
    text = served.template.render(turns, True, served.native.bos_text, served.native.eos_text, tools)
    return served.native.prompt_tokens(text)


def tools_for(body: Any, template_format: ToolFormat) -> tuple[list[Tool], str | None, tuple[str, ...]]:
    """The tools a chat request offers, the grammar its ``tool_choice`` puts the answer under and
    that grammar's lazy triggers: "required" or a named function is always a valid call; "auto"
    lets the model choose, and a call it begins is valid; "none" offers none."""
    if not body.tools or body.tool_choice == "none":
        return [], None, ()
    tools = [Tool(t.function.name, t.function.description, t.function.parameters) for t in body.tools]
    check_tools(tools)
    choice = body.tool_choice if isinstance(body.tool_choice, str | None) else body.tool_choice.function.name
    shaped = body.response_format is not None and body.response_format.type != "text"
    if choice in (None, "auto") and shaped:
        return tools, None, ()  # the response format shapes the answer; calls are still parsed
    if choice not in (None, "auto") and shaped:
        raise UsageError("a forced tool call and response_format cannot both shape the answer")
    grammar, triggers = tool_grammar(template_format, tools, choice)
    return tools, grammar, triggers


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


def grammar_for(fmt: Any) -> str | None:
    """The grammar a ``response_format`` asks for, if any."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar()
    if fmt.json_schema is None or not fmt.json_schema.schema_:
        raise UsageError("response_format json_schema needs a schema")
    return json_grammar(fmt.json_schema.schema_)


def generation(served: Served, body: Any, prompt: list[int], max_tokens: int | None, defaults: SamplingOptions,
               grammar: str | None, logprobs: int | None, reasoning: bool = False, choice: int = 0,
               triggers: tuple[str, ...] = ()) -> GenerationRequest:
    """The engine request for an OpenAI body, every sampling field checked against this model;
    ``choice``: which of ``n`` answers (a given seed moves on by one for each)."""
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
        seed=-1 if body.seed is None else body.seed + choice,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        grammar=grammar,
        grammar_triggers=triggers if grammar else (),
        logprobs=logprobs,
        logit_bias=_logit_bias(body.logit_bias),
    )
    return request_for(served, prompt, sampling, reasoning)


def request_for(served: Served, prompt: list[int], sampling: SamplingOptions, reasoning: bool = True
                ) -> GenerationRequest:
    """The engine request for a prompt, refused when it and the answer's length cannot fit.
    ``reasoning``: a reasoning model's ``<think>`` block comes apart from its answer."""
    n_ctx = served.engine.n_ctx
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens, which does not fit the {n_ctx}-token context")
    if sampling.max_tokens > 0 and len(prompt) + sampling.max_tokens > n_ctx:
        raise UsageError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({sampling.max_tokens}) exceeds the {n_ctx}-token context"
        )
    thinking = reasoning and opens_thinking(served.native.piece, prompt)
    return GenerationRequest(prompt=prompt, sampling=sampling, emit=lambda _: None,  # emit: set by chunks()
                             reasoning=reasoning, thinking=thinking)


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
