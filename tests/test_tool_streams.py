"""Parallel and incremental tool calls, and streams kept alive while a long prompt is read, through
a real `edgellm serve` of the bundled SmolLM2 (its own template: the generic call format) and the
real openai, anthropic and ollama clients. A conversation in which the assistant has answered a
two-city question with one call per city leads the model to do the same for the next one."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from tests.test_server import Server
from tests.test_tools import WEATHER

FIRST = [
    {"role": "user", "content": "What is the weather in Paris and in Rome?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "24 C"},
    {"role": "assistant", "content": "Paris: 18 C, Rome: 24 C."},
]
ASK = {"role": "user", "content": "What is the weather in Berlin and in Paris?"}
CITIES = {"Paris", "Berlin", "Rome"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--ctx", "2048")
    yield s
    s.stop()


def _required(server: Server) -> dict:
    """A chat completion that must call get_weather, after the two-call example."""
    return {"model": server.name, "messages": [*FIRST, ASK], "tools": [WEATHER], "tool_choice": "required",
            "temperature": 0, "max_tokens": 200}


def _cities(arguments: list) -> list[str]:
    found = [(json.loads(a) if isinstance(a, str) else a)["city"] for a in arguments]
    assert set(found) <= CITIES, found
    return found


def test_two_needed_calls_come_back_as_two_calls_in_every_dialect(server: Server) -> None:
    import anthropic
    import ollama

    openai = server.client()
    reply = openai.chat.completions.create(**_required(server))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert len(_cities([c.function.arguments for c in reply.choices[0].message.tool_calls])) >= 2
    one = openai.chat.completions.create(**_required(server), parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1

    responses = openai.responses.create(
        model=server.name,
        tool_choice="required",
        temperature=0,
        max_output_tokens=200,
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}],
        input=[
            FIRST[0],
            *[
                {
                    "type": "function_call",
                    "call_id": c["id"],
                    "name": c["function"]["name"],
                    "arguments": c["function"]["arguments"],
                }
                for c in FIRST[1]["tool_calls"]
            ],
            {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "call_2", "output": "24 C"},
            {"role": "assistant", "content": FIRST[4]["content"]},
            ASK,
        ],
    )
    calls = [item for item in responses.output if item.type == "function_call"]
    assert len(_cities([c.arguments for c in calls])) >= 2

    claude = anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0)
    message = claude.messages.create(
        model=server.name,
        max_tokens=200,
        extra_body={"temperature": 0},
        messages=_anthropic([*FIRST, ASK]),
        tools=[
            {
                "name": "get_weather",
                "description": WEATHER["function"]["description"],
                "input_schema": WEATHER["function"]["parameters"],
            }
        ],
        tool_choice={"type": "any"},
    )
    uses = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use" and len(_cities([u.input for u in uses])) >= 2
    single = claude.messages.create(
        model=server.name,
        max_tokens=200,
        extra_body={"temperature": 0},
        messages=_anthropic([*FIRST, ASK]),
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    assert len([b for b in single.content if b.type == "tool_use"]) == 1

    # Ollama has no tool_choice: a JSON format shapes the answer into two calls, which are read from it
    call = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
        "required": ["name", "arguments"],
    }
    shape = {
        "type": "object",
        "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 2, "maxItems": 2}},
        "required": ["tool_calls"],
    }
    chat = ollama.Client(host=server.base).chat(
        model=server.name,
        messages=[FIRST[0], ASK],
        tools=[WEATHER],
        format=shape,
        options={"temperature": 0, "num_predict": 200},
    )
    assert len(_cities([c.function.arguments for c in chat.message.tool_calls])) == 2


def _anthropic(messages: list[dict]) -> list[dict]:
    """The conversation in Anthropic's blocks."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            out.append(
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_" + c["id"],
                            "name": c["function"]["name"],
                            "input": json.loads(c["function"]["arguments"]),
                        }
                        for c in m["tool_calls"]
                    ],
                }
            )
        elif m["role"] == "tool":
            result = {
                "type": "tool_result",
                "tool_use_id": "toolu_" + m["tool_call_id"],
                "content": m["content"],
            }
            if out[-1]["role"] == "user":
                out[-1]["content"].append(result)
            else:
                out.append({"role": "user", "content": [result]})
        else:
            out.append({"role": m["role"], "content": [{"type": "text", "text": m["content"]}]})
    return out


def test_call_arguments_stream_as_they_are_written(server: Server) -> None:
    """The name comes first, then the arguments in many small pieces (not one piece at the end),
    in OpenAI's deltas, Anthropic's input_json_delta and the Responses API's argument deltas;
    joined, they are the arguments of the answer."""
    import anthropic

    openai = server.client()
    pieces: dict[int, list[str]] = {}
    names = {}
    for chunk in openai.chat.completions.create(**_required(server), stream=True):
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta.function.name:
                assert delta.index not in names and delta.index not in pieces  # the name before any argument
                names[delta.index] = delta.function.name
            if delta.function.arguments:
                pieces.setdefault(delta.index, []).append(delta.function.arguments)
    assert len(names) >= 2 and set(names.values()) == {"get_weather"}
    for index, parts in pieces.items():
        whole = "".join(parts)
        assert json.loads(whole)["city"] in CITIES
        assert len(parts) >= len(whole) / 6, parts  # a piece is a token or two, as it was written

    claude = anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0)
    partial = []
    with claude.messages.stream(
        model=server.name,
        max_tokens=200,
        extra_body={"temperature": 0},
        messages=_anthropic([*FIRST, ASK]),
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
        tool_choice={"type": "any"},
    ) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partial.append(event.delta.partial_json)
        final = stream.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    assert len(uses) >= 2 and len(partial) >= 2 * len(uses) * 5, partial

    deltas = []
    done = []
    for event in openai.responses.create(
        model=server.name,
        input=[*FIRST[:1], ASK],
        tool_choice="required",
        temperature=0,
        max_output_tokens=200,
        stream=True,
        tools=[{"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}],
    ):
        if event.type == "response.function_call_arguments.delta":
            deltas.append(event.delta)
        elif event.type == "response.output_item.done" and event.item.type == "function_call":
            done.append(event.item)
    complete = [item.arguments for item in done if item.status == "completed"]
    assert complete and len(deltas) >= 5 * len(done)
    assert all(json.loads(arguments)["city"] in CITIES for arguments in complete)


def _raw_stream(server: Server, path: str, body: dict) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    raw = response.read()
    assert response.status == 200, raw
    return raw


def test_a_long_prompt_is_read_while_the_stream_stays_alive(server: Server) -> None:
    """A stream starts before its first token and beats while the prompt is read (clients give up
    on a response whose headers do not come): SSE comments saying how far the reading has got
    for OpenAI's APIs, ping events for Anthropic's, then the answer as usual."""
    words = " ".join(f"x{i}item{i * 7}" for i in range(170))  # about 1300 tokens: 5 s to read here
    raw = _raw_stream(
        server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "Count these: " + words}], "max_tokens": 4},
    )
    head, _, rest = raw.partition(b"data: ")
    assert head.startswith(b": reading the prompt: ") and b"tokens" in head, raw[:200]
    assert rest and raw.rstrip().endswith(b"data: [DONE]")
    raw = _raw_stream(
        server,
        "/v1/messages",
        {
            "model": server.name,
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "List these: " + words}],
        },
    )
    events = [line[7:] for line in raw.decode().splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "ping"] and events[-1] == "message_stop", events
