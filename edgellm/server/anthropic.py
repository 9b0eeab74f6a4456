"""Anthropic's Messages API (``POST /v1/messages``, streamed or not, and ``count_tokens``), so the
anthropic SDK and the tools built on it talk to a local model: text, system prompts, stop
sequences, and tools (``tool_use`` and ``tool_result`` blocks) on the same engine and templates
as the OpenAI routes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, StrictStr

from edgellm.errors import EdgeLLMError, UsageError, brief
from edgellm.runtime.chunks import Chunk, joined
from edgellm.runtime.request import CallRules, GenerationSpec, prompt_for
from edgellm.runtime.templates import Message
from edgellm.runtime.tools import MAX_TOOLS, Tool, ToolCall
from edgellm.runtime.toolstream import CallArguments, CallBegun, Content
from edgellm.server.bodies import anthropic_error
from edgellm.server.generation import Paced, Reading, Thought, answer_items, prepared, served_model
from edgellm.server.schemas import MAX_MESSAGES, MAX_NAME, Body, text_of
from edgellm.server.streaming import EventStream

router = APIRouter()
#: the error bodies this API's clients read
ERRORS = anthropic_error


class Block(Body):
    type: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    text: StrictStr | None = None
    id: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None  # tool_use
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    input: dict[str, Any] | None = None
    tool_use_id: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None  # tool_result
    content: StrictStr | list[Block] | None = None


class AnthropicMessage(Body):
    role: Literal["user", "assistant", "system"]  # system: Claude Code sends some in the conversation
    content: StrictStr | Annotated[list[Block], Field(max_length=MAX_MESSAGES)]


class AnthropicTool(Body):
    name: Annotated[StrictStr, Field(max_length=64)]
    description: StrictStr = ""
    input_schema: dict[str, Any] | None = None


class AnthropicToolChoice(Body):
    type: Literal["auto", "any", "tool", "none"]
    name: Annotated[StrictStr, Field(max_length=64)] | None = None
    disable_parallel_tool_use: StrictBool = False


class MessagesRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    messages: Annotated[list[AnthropicMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: StrictInt = Field(ge=1, le=1 << 20)
    system: StrictStr | list[Block] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, le=100_000)
    stop_sequences: Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stream: StrictBool = False
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: AnthropicToolChoice | None = None


class CountTokensRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    messages: Annotated[list[AnthropicMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: StrictStr | list[Block] | None = None
    tools: Annotated[list[AnthropicTool], Field(max_length=MAX_TOOLS)] | None = None


def _turns(body: MessagesRequest | CountTokensRequest) -> list[Message]:
    """Anthropic's conversation as the runtime's messages: tool_use blocks become the assistant's
    calls, tool_result blocks the tool turns that answer them, and system messages among the turns
    join the system prompt, in order (templates take one, first)."""
    system = [text_of(body.system, ("text",), "the system prompt")] if body.system else []
    system += [text_of(m.content, ("text",), "a system message") for m in body.messages if m.role == "system"]
    turns = [Message("system", "\n\n".join(system))] if system else []
    for message in body.messages:
        if message.role == "system":
            continue
        if isinstance(message.content, str):
            turns.append(Message(message.role, message.content))
            continue
        text, calls = [], []
        for block in message.content:
            if block.type == "text" and block.text is not None:
                text.append(block.text)
            elif block.type == "tool_use" and message.role == "assistant" and block.name:
                calls.append(ToolCall(block.name, json.dumps(block.input or {}), block.id or ""))
            elif block.type == "tool_result" and message.role == "user":
                turns.append(Message("tool", text_of(block.content, ("text",), "a tool result"),
                                     tool_call_id=block.tool_use_id))
            else:
                raise UsageError(f"a {brief(block.type)} block cannot stand in a {message.role} message here; "
                                 "the served models read text and tool blocks only")
        if text or calls:
            turns.append(Message(message.role, "".join(text), tuple(calls)))
    return turns


def _tools(body: MessagesRequest | CountTokensRequest) -> tuple[Tool, ...]:
    return tuple(Tool(t.name, t.description, t.input_schema) for t in body.tools or ())


#: Anthropic's tool_choice types in the spec's words
_CHOICES = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}
_FIELDS = {"format": "format", "tools": "tools", "tool_choice": "tool_choice", "messages": "messages"}


def messages_spec(body: MessagesRequest) -> GenerationSpec:
    """A Messages request in no API's words."""
    choice = body.tool_choice
    given = {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
    return GenerationSpec(
        tuple(_turns(body)), tools=_tools(body), tool_choice=_CHOICES[choice.type] if choice else "auto",
        tool_name=choice.name if choice else None,
        parallel_tool_calls=not (choice and choice.disable_parallel_tool_use), max_tokens=body.max_tokens,
        stop=tuple(body.stop_sequences or ()), sampling={k: v for k, v in given.items() if v is not None},
        fields=_FIELDS)


@router.post("/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> dict:
    served = await served_model(request, body.model)
    spec = GenerationSpec(tuple(_turns(body)), tools=_tools(body), fields=_FIELDS)
    prompt = await asyncio.to_thread(prompt_for, spec, served.model)
    return {"input_tokens": len(prompt)}


@router.post("/messages")
async def messages(body: MessagesRequest, request: Request):
    served = await served_model(request, body.model)
    ready = await prepared(served, messages_spec(body), request.app.state.config.defaults)
    reply = Reply(served.name, len(ready.prompt), ready.calls)
    paced = Paced(ready.request(), served)
    if not body.stream:
        return reply.whole(await paced.gathered())
    first = await paced.first()  # errors before the first token still become an HTTP error
    return EventStream(reply.events(first, paced), media_type="text/event-stream")


_STOP_REASONS = {"length": "max_tokens", "cancelled": "end_turn"}


class Reply:
    """One answer in Anthropic's shapes: a message object, or its stream of events."""

    def __init__(self, model: str, n_prompt: int, calls: CallRules | None) -> None:
        self.id = "msg_" + uuid.uuid4().hex[:24]
        self.model, self.n_prompt, self.calls = model, n_prompt, calls

    def message(self, text: str, last: Chunk, thought: str = "", calls: list[ToolCall] | None = None) -> dict:
        """The message object; ``calls`` None: read from ``text`` with the request's rules."""
        content: list[dict] = [{"type": "thinking", "thinking": thought, "signature": ""}] if thought else []
        stop_reason = "stop_sequence" if last.stop else _STOP_REASONS.get(last.finish_reason or "", "end_turn")
        stop_sequence = last.stop
        if calls is None:
            text, calls = self.calls.split(text) if self.calls is not None else (text, [])
        if text:
            content.append({"type": "text", "text": text})
        for call in calls:
            content.append({"type": "tool_use", "id": _tool_use_id(call.id), "name": call.name,
                            "input": json.loads(call.arguments)})
        if calls:
            stop_reason, stop_sequence = "tool_use", None
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": self.n_prompt, "output_tokens": last.timings.generated_tokens}}

    def whole(self, got: list[Chunk]) -> dict:
        text, thought = joined(got)
        return self.message(text, got[-1], thought)

    async def events(self, first: Chunk | Reading, paced: Paced) -> AsyncIterator[bytes]:
        """message_start, then pings while the prompt is read, then each content block as it comes:
        thinking and text by deltas, a tool_use block opened once its name is known and its input
        streamed as it is written; message_delta and message_stop."""
        start = {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                 "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": self.n_prompt, "output_tokens": 0}}
        blocks = _Blocks()
        thought: list[str] = []
        try:
            yield _event("message_start", {"type": "message_start", "message": start})
            async for item in answer_items(first, paced, self.calls):
                if isinstance(item, Reading):
                    yield _event("ping", {"type": "ping"})
                elif isinstance(item, Thought):
                    thought.append(item.text)
                    yield blocks.delta("thinking", {"type": "thinking_delta", "thinking": item.text})
                elif isinstance(item, Content):
                    yield blocks.delta("text", {"type": "text_delta", "text": item.text})
                elif isinstance(item, CallBegun):
                    yield blocks.open(f"call {item.index}", {"type": "tool_use", "id": _tool_use_id(item.id),
                                                             "name": item.name, "input": {}})
                elif isinstance(item, CallArguments):
                    delta = {"type": "input_json_delta", "partial_json": item.text}
                    yield blocks.delta(f"call {item.index}", delta)
                else:
                    final = self.message(item.content, item.last, "".join(thought), item.calls)
                    if item.unfinished:  # the last tool_use streamed was cut short
                        final["stop_reason"] = "max_tokens"
            yield blocks.close()
            yield _event("message_delta", {"type": "message_delta",
                                           "delta": {"stop_reason": final["stop_reason"],
                                                     "stop_sequence": final["stop_sequence"]},
                                           "usage": {"output_tokens": final["usage"]["output_tokens"]}})
            yield _event("message_stop", {"type": "message_stop"})
        except EdgeLLMError as exc:  # too late for an HTTP status: an error event, as Anthropic sends
            yield _event("error", {"type": "error", "error": {"type": "api_error", "message": str(exc)}})
        finally:
            await paced.aclose()


def _tool_use_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class _Blocks:
    """The content blocks of a stream: a block opens when its first delta comes (a tool_use block
    when its name is known), the one before it closing then."""

    _OPEN = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}

    def __init__(self) -> None:
        self.index, self.kind = -1, None

    def open(self, kind: str, block: dict) -> bytes:
        out = self.close()
        self.index, self.kind = self.index + 1, kind
        return out + _event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                    "content_block": block})

    def delta(self, kind: str, delta: dict) -> bytes:
        out = self.open(kind, self._OPEN[kind]) if kind != self.kind else b""
        return out + _event("content_block_delta", {"type": "content_block_delta", "index": self.index, "delta": delta})

    def close(self) -> bytes:
        if self.kind is None:
            return b""
        self.kind = None
        return _event("content_block_stop", {"type": "content_block_stop", "index": self.index})


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()
