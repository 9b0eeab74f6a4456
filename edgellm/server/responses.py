"""OpenAI's Responses API (``POST /v1/responses``, streamed or not): text, instructions, function
tools with their calls and outputs, JSON formats, ``previous_response_id``, and reading a response
back (``GET``, ``DELETE``, its ``input_items``). Responses are kept in memory for the server's life
on ``app.state.responses``: the newest ``MAX_KEPT``, at most ``MAX_KEPT_BYTES`` in all."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field, StrictBool, StrictInt, StrictStr, field_validator

from edgellm.errors import EdgeLLMError, ModelNotFoundError, UsageError, brief
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.request import CallRules, GenerationSpec
from edgellm.runtime.templates import Message
from edgellm.runtime.tools import MAX_TOOLS, Tool, ToolCall
from edgellm.runtime.toolstream import CallArguments, CallBegun, Content
from edgellm.server.bodies import openai_error
from edgellm.server.generation import Ended, Paced, Reading, answer_items, prepared, served_model
from edgellm.server.schemas import MAX_MESSAGES, MAX_NAME, Body, text_of
from edgellm.server.streaming import EventStream

router = APIRouter()
#: the error bodies this API's clients read
ERRORS = openai_error

#: responses kept for ``previous_response_id`` and reading back, and the most bytes they may take
MAX_KEPT = 1024
MAX_KEPT_BYTES = 64 << 20


class Part(Body):
    type: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    text: StrictStr | None = None


class Item(Body):
    """One input item: a message (role and content), a function call, or a call's output."""

    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: StrictStr | Annotated[list[Part], Field(max_length=MAX_MESSAGES)] | None = None
    call_id: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    arguments: StrictStr | None = None
    output: StrictStr | None = None


class FunctionTool(Body):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(max_length=64)]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None


class NamespaceTool(Body):
    """A group of functions (Codex sends its tools so): offered as the functions it holds."""

    type: Literal["namespace"]
    name: Annotated[StrictStr, Field(max_length=64)] | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] = Field(default_factory=list)


class HostedTool(Body):
    """A tool OpenAI runs itself (web search, file search, a code interpreter, ...): nothing here can
    run it, so it is not offered; a request that forces it is refused."""

    type: Annotated[StrictStr, Field(max_length=MAX_NAME)]

    @field_validator("type")
    @classmethod
    def _hosted(cls, kind: str) -> str:
        if kind in ("function", "namespace"):  # a malformed one of these is an error, not a hosted tool
            raise ValueError(f"a {kind} tool needs its fields")
        return kind


class NamedTool(Body):
    type: Literal["function"]
    name: Annotated[StrictStr, Field(max_length=64)]


class HostedChoice(HostedTool):
    pass


class TextFormat(Body):
    type: Literal["text", "json_object", "json_schema"] = "text"
    schema_: dict[str, Any] | None = Field(None, alias="schema")


class TextOptions(Body):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    input: StrictStr | Annotated[list[Item], Field(max_length=MAX_MESSAGES)]
    instructions: StrictStr | None = None
    tools: Annotated[list[FunctionTool | NamespaceTool | HostedTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedTool | HostedChoice | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: StrictBool = False
    parallel_tool_calls: StrictBool = True
    previous_response_id: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    text: TextOptions | None = None


@dataclass(frozen=True)
class Stored:
    """A response as it is kept: the conversation it ended, the object, the input items it was given."""

    turns: list[Message]
    response: dict
    items: list[dict]
    size: int  # bytes, as JSON, of the object and the items


class Kept:
    """The responses this server made, by id, for ``previous_response_id`` and for reading back: the
    newest MAX_KEPT of them, and no more than MAX_KEPT_BYTES in all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0

    def stored(self, response_id: str) -> Stored:
        with self._lock:
            found = self._kept.get(response_id)
        if found is None:
            raise ModelNotFoundError(f"response {brief(response_id)} is not known here",
                                     hint="responses are kept in memory while the server runs")
        return found

    def get(self, response_id: str) -> list[Message]:
        return self.stored(response_id).turns

    def put(self, response_id: str, turns: list[Message], response: dict, items: list[dict]) -> None:
        size = len(json.dumps(response)) + len(json.dumps(items)) + sum(len(m.content) for m in turns)
        with self._lock:
            self._kept[response_id] = Stored(turns, response, items, size)
            self._bytes += size
            while len(self._kept) > MAX_KEPT or (self._bytes > MAX_KEPT_BYTES and len(self._kept) > 1):
                self._bytes -= self._kept.popitem(last=False)[1].size

    def delete(self, response_id: str) -> None:
        with self._lock:
            found = self._kept.pop(response_id, None)
            if found is not None:
                self._bytes -= found.size
        if found is None:
            raise ModelNotFoundError(f"response {brief(response_id)} is not known here")


def input_items(body: ResponsesRequest) -> list[dict]:
    """The request's input as the items ``input_items`` lists (a text is one user message)."""
    given = [Item(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    items = []
    for item in given:
        data = item.model_dump(exclude_none=True)
        if item.type == "message":
            content = item.content if isinstance(item.content, list) else [Part(type="input_text", text=item.content or "")]
            data["content"] = [part.model_dump(exclude_none=True) for part in content]
        items.append({"id": "msg_" + uuid.uuid4().hex[:24], **data})
    return items


@router.get("/responses/{response_id}")
async def retrieve(response_id: str, request: Request) -> dict:
    return request.app.state.responses.stored(response_id).response


@router.delete("/responses/{response_id}")
async def delete(response_id: str, request: Request) -> dict:
    request.app.state.responses.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/responses/{response_id}/input_items")
async def list_input_items(response_id: str, request: Request) -> dict:
    items = request.app.state.responses.stored(response_id).items
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": False}


def _turns(body: ResponsesRequest, kept: Kept) -> list[Message]:
    turns = list(kept.get(body.previous_response_id)) if body.previous_response_id else []
    if body.instructions:
        turns = [m for m in turns if m.role != "system"]
        turns.insert(0, Message("system", body.instructions))
    if isinstance(body.input, str):
        return [*turns, Message("user", body.input)]
    for item in body.input:
        if item.type == "message":
            role = "system" if item.role == "developer" else item.role or "user"
            turns.append(Message(role, text_of(item.content, ("input_text", "output_text", "text"), "an input")))
        elif item.type == "function_call":
            turns.append(Message("assistant", "", (ToolCall(item.name or "", item.arguments or "{}", item.call_id or ""),)))
        else:
            turns.append(Message("tool", item.output or "", tool_call_id=item.call_id))
    return turns


def functions(body: ResponsesRequest) -> list[FunctionTool]:
    """The function tools a request offers: its own, and those its namespaces hold (hosted tools
    are left out)."""
    found = []
    for tool in body.tools or ():
        if isinstance(tool, FunctionTool):
            found.append(tool)
        elif isinstance(tool, NamespaceTool):
            found += tool.tools
    return found


def responses_spec(body: ResponsesRequest, turns: list[Message]) -> GenerationSpec:
    """A Responses request in no API's words."""
    choice, name = body.tool_choice or "auto", None
    if isinstance(choice, HostedChoice):
        raise UsageError(f"tool_choice forces the hosted tool {brief(choice.type)}, which this server cannot run")
    if isinstance(choice, NamedTool):
        choice, name = "function", choice.name
    fmt = body.text.format if body.text else None
    shaped = fmt is not None and fmt.type != "text"
    given = {"temperature": body.temperature, "top_p": body.top_p}
    return GenerationSpec(
        tuple(turns), tools=tuple(Tool(t.name, t.description or "", t.parameters) for t in functions(body)),
        tool_choice=choice, tool_name=name, parallel_tool_calls=body.parallel_tool_calls, json_answer=shaped,
        json_schema=fmt.schema_ if shaped and fmt.type == "json_schema" else None,
        max_tokens=body.max_output_tokens, sampling={k: v for k, v in given.items() if v is not None},
        fields={"format": "text.format.schema", "tools": "tools", "tool_choice": "tool_choice",
                "messages": "input"})


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request):
    served = await served_model(request, body.model)
    kept = request.app.state.responses
    turns = _turns(body, kept)
    ready = await prepared(served, responses_spec(body, turns), request.app.state.config.defaults)
    reply = Reply(served.name, body, len(ready.prompt), turns, ready.calls, kept)
    paced = Paced(ready.request(), served)
    if not body.stream:
        got = await paced.gathered()
        return reply.finish("".join(c.text for c in got), got[-1])
    first = await paced.first()  # errors before the first token still become an HTTP error
    return EventStream(reply.events(first, paced), media_type="text/event-stream")


class Reply:
    """One response: the object, and the events that stream it."""

    def __init__(self, model: str, body: ResponsesRequest, n_prompt: int, turns: list[Message],
                 calls: CallRules | None, kept: Kept) -> None:
        self.id = "resp_" + uuid.uuid4().hex[:24]
        self.message_id = "msg_" + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model, self.body, self.n_prompt, self.turns, self.calls = model, body, n_prompt, turns, calls
        self.kept = kept
        self._sequence = 0

    def response(self, status: str, output: list[dict], usage: dict | None = None, reason: str | None = None) -> dict:
        body = self.body
        choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedTool) else body.tool_choice or "auto"
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status, "model": self.model,
                "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": reason} if reason else None, "instructions": body.instructions,
                "tools": [t.model_dump(by_alias=True) for t in body.tools or ()], "tool_choice": choice,
                "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature, "top_p": body.top_p,
                "max_output_tokens": body.max_output_tokens, "previous_response_id": body.previous_response_id,
                "text": {"format": {"type": body.text.format.type if body.text else "text"}}, "metadata": {}}

    def message_item(self, text: str, status: str) -> dict:
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" or text else []
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def finish(self, text: str, last: Chunk, calls: list[ToolCall] | None = None) -> dict:
        """The completed response (``calls`` None: read from ``text`` with the request's rules); its
        conversation is kept for a later ``previous_response_id``."""
        if calls is None:
            text, calls = self.calls.split(text) if self.calls is not None else (text, [])
        output = [self.message_item(text, "completed")] if text or not calls else []
        output += [_call_item(c, "completed") for c in calls]
        done = last.timings.generated_tokens
        usage = {"input_tokens": self.n_prompt, "input_tokens_details": {"cached_tokens": last.timings.cached_tokens},
                 "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": self.n_prompt + done}
        incomplete = last.finish_reason == "length"
        response = self.response("incomplete" if incomplete else "completed", output, usage,
                                 "max_output_tokens" if incomplete else None)
        self.kept.put(self.id, [*self.turns, Message("assistant", text, tuple(calls))], response,
                      input_items(self.body))
        return response

    def _event(self, kind: str, **data: Any) -> bytes:
        self._sequence += 1
        payload = {"type": kind, "sequence_number": self._sequence, **data}
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()

    async def events(self, first: Chunk | Reading, paced: Paced) -> AsyncIterator[bytes]:
        """created, then each output item as it comes: the message with its text deltas, each
        function call once its name is known with its arguments as they are written; completed.
        SSE comments keep the stream alive while the prompt is read."""
        texts: list[str] = []  # the message item's text, once it is open
        items: list[dict] = []  # the items opened, in output order
        calls: dict[int, dict] = {}  # the function call items by the call's index
        try:
            yield self._event("response.created", response=self.response("in_progress", []))
            yield self._event("response.in_progress", response=self.response("in_progress", []))
            async for item in answer_items(first, paced, self.calls):
                if isinstance(item, Reading):
                    yield item.comment()
                elif isinstance(item, Content):
                    if not any(i["type"] == "message" for i in items):
                        items.append(self.message_item("", "in_progress"))
                        yield self._event("response.output_item.added", output_index=len(items) - 1,
                                          item=items[-1])
                        yield self._event("response.content_part.added", item_id=self.message_id,
                                          output_index=len(items) - 1, content_index=0,
                                          part={"type": "output_text", "text": "", "annotations": []})
                    texts.append(item.text)
                    yield self._event("response.output_text.delta", **self._at(items, self.message_id),
                                      delta=item.text, logprobs=[])
                elif isinstance(item, CallBegun):
                    items.append(_call_item(ToolCall(item.name, "", item.id), "in_progress"))
                    calls[item.index] = items[-1]
                    yield self._event("response.output_item.added", output_index=len(items) - 1,
                                      item=items[-1])
                elif isinstance(item, CallArguments):
                    opened = calls[item.index]
                    opened["arguments"] += item.text
                    yield self._event("response.function_call_arguments.delta", item_id=opened["id"],
                                      output_index=items.index(opened), delta=item.text)
                elif isinstance(item, Ended):
                    final = self.finish(item.content, item.last, item.calls)
            for index, opened in enumerate(items):
                done = next((o for o in final["output"] if o["id"] == opened["id"]), None) or {
                    **opened, "status": "incomplete"}  # a call the length cut short
                if opened["type"] == "message":
                    text = "".join(texts)
                    part = {"type": "output_text", "text": text, "annotations": []}
                    yield self._event("response.output_text.done", **self._at(items, self.message_id),
                                      text=text, logprobs=[])
                    yield self._event("response.content_part.done", item_id=self.message_id,
                                      output_index=index, content_index=0, part=part)
                    done = {**done, "content": [part]}
                else:
                    yield self._event("response.function_call_arguments.done", item_id=opened["id"],
                                      output_index=index, arguments=done["arguments"])
                yield self._event("response.output_item.done", output_index=index, item=done)
            if not items:  # an empty answer still has its (empty) message
                for index, done in enumerate(final["output"]):
                    yield self._event("response.output_item.added", output_index=index, item=done)
                    yield self._event("response.output_item.done", output_index=index, item=done)
            yield self._event("response.completed", response=final)
        except EdgeLLMError as exc:  # too late for an HTTP status: an error event
            yield self._event("error", code=exc.code, message=str(exc), param=None)
        finally:
            await paced.aclose()

    @staticmethod
    def _at(items: list[dict], item_id: str) -> dict:
        index = next(i for i, item in enumerate(items) if item["id"] == item_id)
        return {"item_id": item_id, "output_index": index, "content_index": 0}


def _call_item(call: ToolCall, status: str) -> dict:
    return {"type": "function_call", "id": "fc_" + call.id.removeprefix("call_"), "call_id": call.id,
            "name": call.name, "arguments": call.arguments, "status": status}
