"""Hostile requests, third round, against one real `edgellm serve` (SmolLM2 with a Hermes-style tool
template, an API key): requests that made llama.cpp's grammar parser overflow its stack, model output
that is not a valid tool call, and the rest of the round's findings. Every dialect where a case
applies, real SDKs where one exists; the same server process must survive all of them."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.test_server import Server
from tests.test_tools import HERMES, WEATHER

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
HI = [{"role": "user", "content": "Hi"}]
CALL = '<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    template = tmp_path_factory.mktemp("tpl") / "hermes.jinja"
    template.write_text(HERMES)
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "4", "--template", str(template),
               "--api-key", KEY)
    yield s
    assert s.proc.poll() is None, "the server died"
    s.stop()


def _post(server: Server, path: str, body: dict | bytes, headers: dict | None = None):
    return server.raw(path, body, {**AUTH, **(headers or {})})


def _alive(server: Server) -> None:
    assert server.proc.poll() is None, server.proc.stderr.read()
    assert server.raw("/health")[0] == 200


# -- grammars whose size a request controls --------------------------------------------------------
REPEATS = {"type": "string", "pattern": "^a{0,100000}$"}
LONG = {"type": "string", "minLength": 1_000_000}


def _with_property(schema: dict) -> dict:
    return {"type": "object", "properties": {"x": schema}, "required": ["x"]}


def _bombs(schema: dict, model: str) -> list[tuple[str, dict]]:
    """The same schema in every place a request can put one."""
    tool = {"type": "function", "function": {"name": "f", "parameters": _with_property(schema)}}
    return [
        ("/v1/chat/completions", {"messages": HI, "tools": [tool], "tool_choice": "required"}),
        ("/v1/chat/completions", {"messages": HI, "tools": [tool]}),
        ("/v1/chat/completions", {"messages": HI, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
        ("/api/chat", {"model": model, "messages": HI, "format": schema, "stream": False}),
        ("/api/generate", {"model": model, "prompt": "Hi", "format": _with_property(schema), "stream": False}),
        ("/v1/responses", {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}),
        ("/v1/responses", {"input": "Hi", "tools": [{"type": "function", "name": "f",
                                                     "parameters": _with_property(schema)}]}),
        ("/v1/messages", {"max_tokens": 8, "messages": HI, "tools": [
            {"name": "f", "input_schema": _with_property(schema)}], "tool_choice": {"type": "any"}}),
    ]


@pytest.mark.parametrize("schema, needle", [(REPEATS, "repeats 100000 times"), (LONG, "minLength is 1000000")])
def test_a_schema_that_would_blow_the_grammar_parser_is_a_400(server: Server, schema: dict, needle: str) -> None:
    for path, body in _bombs(schema, server.name):
        status, answer, _ = _post(server, path, {"max_tokens": 8, **body})
        assert status == 400, (path, status, answer)
        assert needle in json.dumps(answer) and "at most 1000 can be enforced" in json.dumps(answer), (path, answer)
    _alive(server)


def test_a_maximum_past_the_bound_is_held_after_generation_not_refused(server: Server) -> None:
    """Claude Code's tools allow strings of 512k characters: the grammar leaves such a maximum out
    and the call's check holds it, so every place a schema goes answers."""
    huge = {"type": "string", "maxLength": 1_000_000, "pattern": "^(yes|no)$"}  # the pattern ends it
    for path, body in _bombs(huge, server.name):
        status, answer, _ = _post(server, path, {**body, "max_tokens": 48, "temperature": 0})
        assert status == 200, (path, status, answer)
    _alive(server)


def test_a_raw_grammar_nested_past_the_bound_is_a_400(server: Server) -> None:
    nested = "root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000
    status, answer, _ = _post(server, "/v1/chat/completions", {"messages": HI, "grammar": nested, "max_tokens": 4})
    assert status == 400 and "grammar nests groups 20000 deep; at most" in answer["error"]["message"], answer
    repeated = 'root ::= "a"{0,100000}'
    status, answer, _ = _post(server, "/v1/chat/completions", {"messages": HI, "grammar": repeated, "max_tokens": 4})
    assert status == 400 and "grammar repeats 100000 times" in answer["error"]["message"], answer
    # the bounds leave real grammars alone: 500 nested groups and a repetition of 1000 still answer
    fine = "root ::= " + "(" * 500 + '"yes"' + ")" * 500 + ' "!"{0,1000}'
    status, answer, _ = _post(server, "/v1/chat/completions", {"messages": HI, "grammar": fine, "max_tokens": 4,
                                                               "temperature": 0})
    assert status == 200 and answer["choices"][0]["message"]["content"].startswith("yes"), answer
    _alive(server)


# -- the model's tool calls are untrusted -------------------------------------------------------------
def _forced(text: str) -> str:
    """A client's grammar that makes the model write exactly ``text``."""
    return "root ::= " + json.dumps(text)


def _strict(raw: bytes) -> object:
    def refuse(name: str):
        raise ValueError(f"{name} in a JSON body")

    return json.loads(raw, parse_constant=refuse)


@pytest.mark.parametrize("name, arguments, why", [
    ("rm_rf", "{}", "a call to a tool never offered"),
    ("get_weather", '"abc"', "arguments that are not an object"),
    ("get_weather", '{"city": NaN, "unit": "celsius"}', "NaN"),
    ("get_weather", '{"city": 1e999, "unit": "celsius"}', "a number past the float range"),
    ("get_weather", '{"city": "Atlantis", "unit": "celsius"}', "a value the schema does not allow"),
])
def test_a_call_that_fails_the_offered_tools_is_text(server: Server, name: str, arguments: str, why: str) -> None:
    text = CALL.format(name=name, arguments=arguments)
    body = {"messages": HI, "tools": [WEATHER], "grammar": _forced(text), "max_tokens": 64, "temperature": 0}
    for stream in (False, True):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json", **AUTH})
        response = conn.getresponse()
        raw = response.read()
        assert response.status == 200, (why, raw)
        if stream:
            events = [_strict(line[6:]) for line in raw.split(b"\n") if line.startswith(b"data: {")]
            deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
            assert not any("tool_calls" in d for d in deltas), why
            assert "".join(d.get("content") or "" for d in deltas) == text, why
        else:
            message = _strict(raw)["choices"][0]["message"]
            assert message["content"] == text and not message.get("tool_calls"), (why, message)
    _alive(server)


def test_valid_calls_pass_and_parallel_false_keeps_one(server: Server) -> None:
    one = CALL.format(name="get_weather", arguments='{"city": "Rome", "unit": "celsius"}')
    two = one + "\n" + CALL.format(name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}')
    client = server.client(api_key=KEY)
    for parallel, count in ((True, 2), (False, 1)):
        reply = client.chat.completions.create(
            model=server.name, messages=HI, tools=[WEATHER], parallel_tool_calls=parallel, max_tokens=96,
            temperature=0, extra_body={"grammar": _forced(two)})
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and len(calls) == count, reply
        assert json.loads(calls[0].function.arguments) == {"city": "Rome", "unit": "celsius"}


def test_a_forced_tool_choice_needs_tools_in_every_dialect(server: Server) -> None:
    cases = [
        ("/v1/chat/completions", {"messages": HI, "tool_choice": "required"}, "tool_choice 'required'"),
        ("/v1/chat/completions", {"messages": HI, "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tool_choice names a function"),
        ("/v1/responses", {"input": "Hi", "tool_choice": "required"}, "tool_choice 'required'"),
        ("/v1/messages", {"messages": HI, "tool_choice": {"type": "any"}}, "tool_choice 'required'"),
    ]
    for path, body, needle in cases:
        status, answer, _ = _post(server, path, {"max_tokens": 8, **body})
        assert status == 400 and needle in json.dumps(answer) and "offers no tools" in json.dumps(answer), answer


def test_a_tool_whose_arguments_are_not_an_object_is_refused(server: Server) -> None:
    """A string schema made the call grammar write ``"abc"`` as arguments: a 500 before."""
    import anthropic

    client = anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="parameters must describe a JSON object, not 'string'"):
        client.messages.create(model=server.name, max_tokens=16, messages=HI, tool_choice={"type": "any"},
                               tools=[{"name": "echo", "input_schema": {"type": "string"}}])
    tool = {"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}
    # the ollama client refuses such a tool itself; others send it
    status, answer, _ = _post(server, "/api/chat", {"model": server.name, "messages": HI, "tools": [tool],
                                                    "stream": False})
    assert status == 400 and "parameters must describe a JSON object" in answer["error"], answer
    _alive(server)


# -- the rest of the round -----------------------------------------------------------------------------
def test_show_answers_only_for_the_served_model(server: Server) -> None:
    for name in ("/etc/passwd", "another", "../models/x"):
        status, answer, _ = _post(server, "/api/show", {"model": name})
        assert status == 404 and "is not served here" in answer["error"], (name, answer)
    status, answer, _ = _post(server, "/api/show", {"model": {"nested": 1}})
    assert status == 400
    status, answer, _ = _post(server, "/api/show", {"model": server.name})
    assert status == 200 and answer["details"]["family"] == "llama"


def test_responses_with_no_input_is_a_400(server: Server) -> None:
    status, answer, _ = _post(server, "/v1/responses", {"input": []})
    assert status == 400 and "the request has no input" in answer["error"]["message"], answer


def test_anthropic_clients_authenticate_with_their_own_header(server: Server) -> None:
    import anthropic

    reply = anthropic.Anthropic(base_url=server.base, api_key=KEY, max_retries=0).messages.create(
        model=server.name, max_tokens=4, messages=HI)
    assert reply.content[0].text
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.base, api_key="wrong", max_retries=0).messages.create(
            model=server.name, max_tokens=4, messages=HI)
    assert server.raw("/v1/models", headers={"Authorization": KEY})[0] == 401  # a bare key is not a bearer


def _raw_exchange(server: Server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request)
        reply = b""
        while not reply.rstrip().endswith(b"}"):
            got = sock.recv(65536)
            if not got:
                break
            reply += got
        return reply


def test_two_host_headers_are_refused(server: Server) -> None:
    for hosts in (b"Host: evil.example\r\nHost: 127.0.0.1\r\n", b"Host: 127.0.0.1\r\nHost: 127.0.0.1\r\n"):
        reply = _raw_exchange(server, b"GET /v1/models HTTP/1.1\r\n" + hosts + b"Authorization: Bearer sesame\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 400") and b"one Host header" in reply, reply
    reply = _raw_exchange(server, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sesame\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200")


def _leave_after_first_bytes(server: Server, body: dict, stream: bool, seen: list) -> None:
    data = json.dumps({**body, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer sesame\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
        if stream:
            got = b""
            while b"data: " not in got:
                got += sock.recv(4096)
            seen.append(got)
        else:
            time.sleep(0.5)


def test_clients_that_leave_free_their_slots(server: Server) -> None:
    """50 streamed clients leave after their first chunk (and 4 whole-answer clients mid-answer),
    each having asked for 1500 tokens; their sequences end at once, so a new request is answered
    as fast as on an idle server, not after the 81,000 tokens nobody reads."""
    long = {"messages": [{"role": "user", "content": "Write a very long story about the sea."}], "max_tokens": 1500,
            "ignore_eos": True}
    seen: list = []
    threads = [threading.Thread(target=_leave_after_first_bytes, args=(server, long, True, seen)) for _ in range(50)]
    threads += [threading.Thread(target=_leave_after_first_bytes, args=(server, long, False, seen)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(seen) == 50
    time.sleep(1.0)
    start = time.monotonic()
    status, answer, _ = _post(server, "/v1/chat/completions", {"messages": HI, "max_tokens": 8})
    assert status == 200 and time.monotonic() - start < 10, time.monotonic() - start
    _alive(server)


@pytest.fixture(scope="module")
def thinking_server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    """A template that opens a ``<think>`` block for the answer, as Qwen3's does; SmolLM2 never
    closes it."""
    template = tmp_path_factory.mktemp("tpl") / "think.jinja"
    template.write_text("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--template", str(template))
    yield s
    s.stop()


def test_an_unclosed_think_block_is_the_answer(thinking_server: Server) -> None:
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    server = thinking_server
    _, chat, _ = server.raw("/v1/chat/completions", {"messages": ask, "max_tokens": 200, "temperature": 0})
    message = chat["choices"][0]["message"]
    assert chat["choices"][0]["finish_reason"] == "stop", chat
    text = message["content"]
    assert "Paris" in text and not message.get("reasoning_content"), message
    _, anthropic, _ = server.raw("/v1/messages", {"messages": ask, "max_tokens": 200, "temperature": 0})
    assert [b["type"] for b in anthropic["content"]] == ["text"] and anthropic["content"][0]["text"] == text
    _, ollama, _ = server.raw("/api/chat", {"model": server.name, "messages": ask, "stream": False,
                                            "options": {"temperature": 0, "num_predict": 200}})
    assert ollama["message"]["content"] == text and "thinking" not in ollama["message"]
    _, responses, _ = server.raw("/v1/responses", {"input": ask[0]["content"], "max_output_tokens": 200,
                                                   "temperature": 0})
    assert responses["output"][0]["content"][0]["text"] == text
    stream = server.client().chat.completions.create(model=server.name, messages=ask, max_tokens=200,
                                                     temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_a_served_model_removed_from_the_store_is_a_404(cli, smollm2: Path) -> None:
    """`edgellm rm` of the model a server serves: once the server has unloaded it (keep-alive), the
    next request was a 500 (llama.cpp could not open the file)."""
    assert cli("import", str(smollm2), "--name", "smol").returncode == 0
    server = Server(cli.home, Path("smol"), "--keep-alive", "1")
    try:
        assert server.raw("/v1/chat/completions", {"messages": HI, "max_tokens": 2})[0] == 200
        assert cli("rm", "smol").returncode == 0
        time.sleep(2.5)  # unloaded as idle
        for path, body in (("/v1/chat/completions", {"messages": HI, "max_tokens": 2}),
                           ("/api/chat", {"model": "smol", "messages": HI, "stream": False})):
            status, answer, _ = server.raw(path, body)
            assert status == 404 and "smol is gone" in json.dumps(answer), answer
        assert server.raw("/health")[0] == 200
    finally:
        server.stop()
