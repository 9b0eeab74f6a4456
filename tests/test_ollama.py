"""Ollama's API through a real `edgellm serve` (the whole store, by name) and the real ollama client."""

from __future__ import annotations

import json

import pytest

from tests.test_server import Server
from tests.test_tools import WEATHER

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
GREEDY = {"temperature": 0, "num_predict": 24}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = Server(tmp_path_factory.mktemp("home"), None, "--parallel", "2")
    yield s
    s.stop()


@pytest.fixture()
def client(server: Server):
    import ollama

    return ollama.Client(host=server.base)


def test_chat_whole_and_streamed(client) -> None:
    whole = client.chat(model=NAME, messages=QUESTION, options=GREEDY)
    assert whole.done and whole.message.role == "assistant" and "Berlin" in whole.message.content
    assert whole.prompt_eval_count > 10 and 0 < whole.eval_count <= 24 and whole.done_reason in ("stop", "length")
    parts = list(client.chat(model=NAME, messages=QUESTION, options=GREEDY, stream=True))
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_and_json_format(client) -> None:
    answer = client.generate(model=NAME, prompt="What is the capital of Germany?", options=GREEDY)
    assert answer.done and "Berlin" in answer.response
    streamed = "".join(p.response for p in client.generate(model=NAME, prompt="What is the capital of Germany?",
                                                            options=GREEDY, stream=True))
    assert streamed == answer.response
    schema = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Berlin"]}}, "required": ["capital"]}
    shaped = client.chat(model=NAME, messages=QUESTION, format=schema, options={"temperature": 0, "num_predict": 32})
    assert json.loads(shaped.message.content) == {"capital": "Berlin"}


def test_list_show_ps_version_embed(client, server: Server) -> None:
    client.chat(model=NAME, messages=QUESTION, options={"num_predict": 1})
    listed = client.list().models
    assert [m.model for m in listed] == [NAME] and listed[0].size > 50 << 20
    assert listed[0].details.family == "llama" and listed[0].details.quantization_level == "Q4_1"
    shown = client.show(NAME)
    assert "im_start" in shown.template and shown.modelinfo["general.architecture"] == "llama"
    assert [m.model for m in client.ps().models] == [NAME]
    assert server.raw("/api/version")[1]["version"]
    vectors = client.embed(model=NAME, input=["The sky is blue.", "The sky is blue."]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == 576 and vectors[0] == pytest.approx(vectors[1], abs=1e-5)


def test_tools_come_back_as_calls(client) -> None:
    import ollama

    reply = client.chat(model=NAME, messages=[{"role": "user", "content": "What is the weather in Rome?"}],
                        tools=[WEATHER], options={"temperature": 0, "num_predict": 96})
    calls = reply.message.tool_calls or []
    assert all(c.function.name == "get_weather" for c in calls)  # "auto": the model may answer in words
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nosuch", messages=QUESTION)
    assert missing.value.status_code == 404 and "not in the store" in missing.value.error


def test_errors_are_ollama_bodies(server: Server) -> None:
    status, body, _ = server.raw("/api/chat", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]})
    assert status == 400 and isinstance(body["error"], str) and "role" in body["error"]
    status, body, _ = server.raw("/api/generate", {"model": NAME, "prompt": "hi", "images": ["AAAA"]})
    assert status == 400 and "read text only" in body["error"]
    status, body, _ = server.raw("/api/nosuch")
    assert status == 404 and set(body) == {"error"}


def test_the_api_as_ollamas_clients_use_it(client, server: Server) -> None:
    """The root answers as Ollama's does (apps' "is it up" checks), NAME:latest is NAME, the older
    embeddings route answers, /api/show says what a model can do, and an empty prompt loads the
    model (keep_alive 0 unloads it)."""
    import urllib.request

    with urllib.request.urlopen(server.base + "/") as reply:
        assert reply.status == 200 and reply.read() == b"Ollama is running"
    with urllib.request.urlopen(urllib.request.Request(server.base + "/", method="HEAD")) as reply:
        assert reply.status == 200
    shown = client.show(f"{NAME}:latest")
    assert {"completion", "tools"} <= set(shown.capabilities) and "<|im_start|>" in shown.template
    vector = client.embeddings(model=f"{NAME}:latest", prompt="a few words").embedding
    assert len(vector) == 576 and abs(sum(v * v for v in vector) - 1) < 1e-3
    assert client.generate(model=NAME, prompt="").done_reason == "load"
    assert [m.model for m in client.ps().models] == [NAME]
    assert client.generate(model=NAME, prompt="", keep_alive=0).done_reason == "unload"
    assert client.ps().models == []
    assert client.chat(model=NAME, messages=[]).done_reason == "load"
    assert [m.model for m in client.ps().models] == [NAME]


@pytest.mark.parametrize("provider", ["ollama", "ollama_chat"])
def test_litellms_ollama_providers(server: Server, provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm's two Ollama providers (which send JSON with no Content-Type): chat, stream, tools,
    embeddings."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    import litellm

    model, base = f"{provider}/{NAME}", server.base
    reply = litellm.completion(model=model, api_base=base, messages=QUESTION, temperature=0, max_tokens=24)
    assert "Berlin" in reply.choices[0].message.content
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in litellm.completion(
        model=model, api_base=base, messages=QUESTION, temperature=0, max_tokens=24, stream=True))
    assert streamed == reply.choices[0].message.content
    if provider == "ollama_chat":  # tools as Ollama's chat takes them; a JSON schema shapes a call
        call = {"type": "object", "properties": {"name": {"const": "get_weather"},
                                                 "arguments": WEATHER["function"]["parameters"]},
                "required": ["name", "arguments"]}
        shape = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                                                 "maxItems": 1}}, "required": ["tool_calls"]}
        called = litellm.completion(model=model, api_base=base, temperature=0, max_tokens=64, tools=[WEATHER],
                                    messages=[{"role": "user", "content": "What is the weather in Berlin?"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "calls", "schema": shape}})
        calls = called.choices[0].message.tool_calls
        assert calls and calls[0].function.name == "get_weather", called
        assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Berlin", "Rome")
    else:  # the generate provider calls tools by a prompt in JSON mode (past a 135M model): a round trip
        history = [{"role": "user", "content": "What is the weather in Berlin?"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_1", "type": "function", "function": {
                           "name": "get_weather", "arguments": '{"city": "Berlin", "unit": "celsius"}'}}]},
                   {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
        answer = litellm.completion(model=model, api_base=base, temperature=0, max_tokens=32, tools=[WEATHER],
                                    messages=history)
        assert answer.choices[0].message.content or answer.choices[0].message.tool_calls, answer
    vectors = litellm.embedding(model=f"ollama/{NAME}", api_base=base, input=["a cat", "a dog"])
    assert len(vectors.data) == 2 and len(vectors.data[0]["embedding"]) > 100
