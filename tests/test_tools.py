"""Tool calling through a real `edgellm serve` and the real openai client, with the bundled SmolLM2:
its own template (no tool support: the tools are described in the system message, the generic
format) and a Hermes-style template (tools rendered by the template, ``<tool_call>`` tags)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_server import Server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 24}},
                   "required": ["timezone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Berlin right now?"}]

HERMES = """{%- if tools %}<|im_start|>system
You may call functions. Signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Answer a call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == "assistant" and m.tool_calls %}<|im_start|>assistant
{%- for c in m.tool_calls %}
<tool_call>{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% elif m.role == "tool" %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture(scope="module", params=["own template", "hermes template"])
def server(request, tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    extra = []
    if request.param == "hermes template":
        template = tmp_path_factory.mktemp("tpl") / "hermes.jinja"
        template.write_text(HERMES)
        extra = ["--template", str(template)]
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "2", *extra)
    yield s
    s.stop()


def _valid(call, name: str, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == name
    arguments = json.loads(call.function.arguments)
    schema = tool["function"]["parameters"]
    assert set(arguments) == set(schema["required"])
    for key, value in arguments.items():
        spec = schema["properties"][key]
        assert value in spec["enum"] if "enum" in spec else isinstance(value, str)
    return arguments


def test_a_required_call_is_valid(server: Server) -> None:
    reply = server.client().chat.completions.create(model=server.name, messages=ASK, tools=[WEATHER, TIME],
                                                    tool_choice="required", temperature=0, max_tokens=96)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    _valid(call, call.function.name, WEATHER if call.function.name == "get_weather" else TIME)


def test_a_named_call_streams_as_deltas(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model=server.name, messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=96, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or ():
                entry = calls.setdefault(delta.index, {"name": "", "arguments": "", "id": delta.id})
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_time" and calls[0]["id"].startswith("call_")
    assert set(json.loads(calls[0]["arguments"])) == {"timezone"}


def test_a_tool_round_trip_completes(server: Server) -> None:
    client = server.client()
    first = client.chat.completions.create(model=server.name, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=96)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    final = client.chat.completions.create(model=server.name, messages=history, tools=[WEATHER], temperature=0,
                                           max_tokens=32)
    assert final.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert final.choices[0].message.content or final.choices[0].message.tool_calls


def test_tool_choice_none_and_bad_tools(server: Server) -> None:
    plain = server.client().chat.completions.create(model=server.name, messages=ASK, tools=[WEATHER],
                                                    tool_choice="none", temperature=0, max_tokens=8)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"
    bad = [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nosuch"}}}, "not among the tools"),
        ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "same name"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot both"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}], "tool_choice": "auto"}, "must be 1-64"),
    ]
    for extra, needle in bad:
        status, body, _ = server.raw("/v1/chat/completions", {"messages": ASK, **extra})
        assert status == 400 and needle in body["error"]["message"], body


def test_run_prints_the_calls(cli, smollm2: Path, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, TIME]))
    done = cli("run", str(smollm2), "--tools", str(tools), "--tool-choice", "get_weather", "-n", "96",
               "--temperature", "0", "What is the weather in Rome?")
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    call = json.loads(line)
    assert call["name"] == "get_weather" and call["arguments"]["city"] in ("Paris", "Berlin", "Rome")
    as_json = cli("run", str(smollm2), "--tools", str(tools), "--tool-choice", "required", "--json", "-n", "96",
                  "--temperature", "0", "What is the weather in Rome?")
    assert json.loads(as_json.stdout)["tool_calls"][0]["name"] in ("get_weather", "get_time")
    for args, needle in ((["--tool-choice", "required"], "--tool-choice needs --tools"),
                         (["--tools", "[]"], "a JSON list of tools"),
                         (["--tools", str(tools), "--tool-choice", "nosuch"], "'nosuch', which is not among the tools")):
        bad = cli("run", str(smollm2), *args, "hi")
        assert bad.returncode == 2 and needle in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_chat_prints_the_calls_each_turn(cli, smollm2: Path, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    done = cli("chat", str(smollm2), "--tools", str(tools), "--tool-choice", "required", "-n", "96", "--temperature", "0",
               input="What is the weather in Rome?\nAnd in Paris?\n")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(calls) == 2 and all(c["name"] == "get_weather" for c in calls)


def test_auto_holds_a_begun_call_to_the_schema(model) -> None:
    """"auto" is a lazy grammar: the text is free until the model writes the call marker, and from
    there the call follows the schema. The model copies an example call for Paris; the schema
    allows only Rome or Oslo, and the call it writes names one of them."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.tools import FORMATS, Tool, call_grammar

    hermes = next(f for f in FORMATS if f.name == "hermes")
    tool = Tool("get_weather", "", {"type": "object", "properties": {"city": {"enum": ["Rome", "Oslo"]}},
                                    "required": ["city"]})
    example = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    prompt = f"Example 1:\n{example}\nExample 2:\n{example}\nExample 3:\n"
    free = "".join(c.text for c in model.complete(prompt, SamplingOptions(temperature=0, max_tokens=40)))
    _, free_calls = hermes.parse(free)
    assert json.loads(free_calls[0].arguments)["city"] not in ("Rome", "Oslo")
    grammar = call_grammar(hermes, [tool], after_trigger=True)
    sampling = SamplingOptions(temperature=0, max_tokens=40, grammar=grammar,
                               grammar_triggers=hermes.triggers)
    text = "".join(c.text for c in model.complete(prompt, sampling))
    _, calls = hermes.parse(text)
    assert calls and json.loads(calls[0].arguments)["city"] in ("Rome", "Oslo")


def test_a_property_with_no_type_takes_any_value(server: Server) -> None:
    """Claude Code's tools describe some properties without a type; llama.cpp reads such a schema
    as any JSON value, and so does edgellm (the binding's converter refused it: a 400)."""
    tool = {"type": "function", "function": {"name": "run_command", "description": "Run a shell command.",
                                             "parameters": {"type": "object", "required": ["command"], "properties": {
                                                 "command": {"description": "The command to run"}}}}}
    reply = server.client().chat.completions.create(
        model=server.name, messages=[{"role": "user", "content": "List the files here."}], tools=[tool],
        tool_choice="required", temperature=0, max_tokens=64)
    (call,) = reply.choices[0].message.tool_calls
    assert call.function.name == "run_command" and "command" in json.loads(call.function.arguments)


@pytest.mark.parametrize("fmt_name", ["hermes", "mistral", "generic"])
def test_parallel_calls_are_as_many_as_the_model_writes(model, fmt_name: str) -> None:
    """A required call's grammar takes every call the model writes in its format (the examples show
    two); with parallel calls off it ends after the first."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.tools import FORMATS, GENERIC, Tool, ToolCall, call_grammar

    fmt = next((f for f in FORMATS if f.name == fmt_name), GENERIC)
    tool = Tool("get_weather", "", {"type": "object", "properties": {"city": {"type": "string"}},
                                    "required": ["city"]})
    example = fmt.write([ToolCall("get_weather", '{"city": "Paris"}'),
                         ToolCall("get_weather", '{"city": "Rome"}')])
    prompt = f"Example 1:\n{example}\nExample 2:\n{example}\nExample 3:\n"
    for parallel in (True, False):
        grammar = call_grammar(fmt, [tool], parallel=parallel)
        got = list(model.complete(prompt, SamplingOptions(temperature=0, max_tokens=120, grammar=grammar)))
        text = "".join(c.text for c in got)
        _, calls = fmt.parse(text)
        if parallel:
            assert len(calls) >= 2, text
        else:  # the grammar ended the answer after one call, well before max_tokens
            assert len(calls) == 1 and got[-1].finish_reason == "stop", text


def _streamed(fmt_name: str, text: str, size: int, parallel: bool = True
              ) -> tuple[str, list[list[str]], list]:
    """(content, [[name, arguments]] per call, events) of ``text`` fed ``size`` characters at a time."""
    from edgellm.runtime.request import CallRules
    from edgellm.runtime.tools import FORMATS, GENERIC, Tool
    from edgellm.runtime.toolstream import CallArguments, CallBegun, CallStream, Content

    fmt = next((f for f in FORMATS if f.name == fmt_name), GENERIC)
    tools = (Tool("get_weather", "", {"type": "object"}), Tool("get_time", "", {"type": "object"}))
    stream = CallStream(CallRules(fmt, tools, parallel))
    events = []
    for i in range(0, len(text), size):
        events += stream.feed(text[i:i + size])
    events += stream.close()
    content, calls = "", []
    for event in events:
        if isinstance(event, Content):
            content += event.text
        elif isinstance(event, CallBegun):
            assert event.index == len(calls)
            calls.append([event.name, ""])
        elif isinstance(event, CallArguments):
            calls[event.index][1] += event.text
    return content, calls, events


@pytest.mark.parametrize("fmt_name", ["hermes", "mistral", "generic"])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_calls_stream_as_they_are_written(fmt_name: str, size: int) -> None:
    """Whatever the pieces, the content before the marker, each call's name and its arguments'
    JSON come out as written; the arguments arrive in as many pieces as were fed."""
    from edgellm.runtime.tools import FORMATS, GENERIC, ToolCall

    fmt = next((f for f in FORMATS if f.name == fmt_name), GENERIC)
    tricky = {"city": "Pa\"ris {[", "days": [1, {"a": None}], "note": "</tool_call> \\u00e9"}
    written = fmt.write([ToolCall("get_weather", json.dumps(tricky)),
                         ToolCall("get_time", '{"zone": "UTC"}')])
    content, calls, events = _streamed(fmt_name, "Let me check. " + written, size)
    assert content.strip() == "Let me check."
    assert [(name, json.loads(arguments)) for name, arguments in calls] == [
        ("get_weather", tricky), ("get_time", {"zone": "UTC"})]
    pieces = sum(type(e).__name__ == "CallArguments" for e in events)
    assert pieces > 20 if size == 1 else pieces >= 2
    # parallel calls off: the first call only, as the non-streamed answer has
    _, first, _ = _streamed(fmt_name, written, size, parallel=False)
    assert [name for name, _ in first] == ["get_weather"]


def test_text_like_a_marker_is_held_until_it_is_not_one() -> None:
    content, calls, events = _streamed("hermes", "a <tool_cal b <to", 1)
    assert content == "a <tool_cal b <to" and calls == []
    assert "".join(e.text for e in events[:-1]).endswith("b ")  # "<to" was held until the answer ended


def test_a_call_to_a_tool_not_offered_never_streams() -> None:
    """The grammar makes a call name an offered tool; text that escaped it (a marker begun
    mid-token) is not sent as a call at all, so a client never sees a call the checks refuse."""
    answer = 'Sure. <tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    content, calls, _ = _streamed("hermes", answer, 1)
    assert calls == [] and content == "Sure. "
