"""OpenAI's Responses API through a real `edgellm serve` and the real openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_server import Server
from tests.test_tools import WEATHER

TOOL = {"type": "function", **WEATHER["function"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "2")
    yield s
    s.stop()


def test_create_whole_and_streamed(server: Server) -> None:
    client = server.client()
    whole = client.responses.create(model=server.name, input="What is the capital of Germany?", temperature=0,
                                    max_output_tokens=24, instructions="You are a helpful assistant.")
    assert whole.status in ("completed", "incomplete") and "Berlin" in whole.output_text
    assert whole.usage.input_tokens > 10 and 0 < whole.usage.output_tokens <= 24
    events = list(client.responses.create(model=server.name, input="What is the capital of Germany?", temperature=0,
                                          max_output_tokens=24, instructions="You are a helpful assistant.",
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text


def test_previous_response_id_continues_the_conversation(server: Server) -> None:
    client = server.client()
    first = client.responses.create(model=server.name, input="My name is Ada. Say hello.", temperature=0,
                                    max_output_tokens=16)
    second = client.responses.create(model=server.name, input="What is my name?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=16)
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    status, body, _ = server.raw("/v1/responses", {"input": "hi", "previous_response_id": "resp_nosuch"})
    assert status == 404 and "not known here" in body["error"]["message"]


def test_function_calls_and_their_output(server: Server) -> None:
    client = server.client()
    called = client.responses.create(model=server.name, input="What is the weather in Paris?", tools=[TOOL],
                                     tool_choice="required", temperature=0, max_output_tokens=96)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city", "unit"}
    streamed = list(client.responses.create(model=server.name, input="What is the weather in Paris?", tools=[TOOL],
                                            tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                            max_output_tokens=96, stream=True))
    assert streamed[-1].response.output[-1].type == "function_call"
    answer = client.responses.create(model=server.name, previous_response_id=called.id, tools=[TOOL],
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": '{"temperature": 21}'}], temperature=0, max_output_tokens=24)
    assert answer.status in ("completed", "incomplete") and answer.output


def test_json_schema_format(server: Server) -> None:
    schema = {"type": "object", "properties": {"capital": {"enum": ["Paris", "Berlin"]}}, "required": ["capital"]}
    reply = server.client().responses.create(
        model=server.name, input="What is the capital of Germany? Answer in JSON.", temperature=0, max_output_tokens=32,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema}})
    assert json.loads(reply.output_text) == {"capital": "Berlin"}


def test_a_stored_response_can_be_read_back_and_deleted(server: Server) -> None:
    """responses.retrieve, input_items.list and delete answered 404 for an id just returned."""
    import openai

    client = server.client()
    made = client.responses.create(model=server.name, temperature=0, max_output_tokens=8,
                                   input=[{"role": "user", "content": "What is the capital of Germany?"}])
    again = client.responses.retrieve(made.id)
    assert again.id == made.id and again.output_text == made.output_text and again.usage == made.usage
    items = client.responses.input_items.list(made.id).data
    assert [(i.type, i.role, i.content[0].text) for i in items] == [
        ("message", "user", "What is the capital of Germany?")]
    client.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=server.name, input="And of France?", previous_response_id=made.id)


def test_codexs_tools_namespaces_and_hosted_ones(server: Server) -> None:
    """Codex sends its functions grouped in a namespace and a web_search tool with every request
    (a 400 before): the namespace's functions are offered, the hosted tool is not, and forcing it
    is refused."""
    tools = [{"type": "namespace", "name": "shell", "tools": [TOOL]}, {"type": "web_search"}]
    status, answer, _ = server.raw("/v1/responses", {"model": server.name, "input": "What is the weather in Rome?",
                                                     "tools": tools, "tool_choice": "required", "temperature": 0,
                                                     "max_output_tokens": 48})
    assert status == 200, answer
    (call,) = [item for item in answer["output"] if item["type"] == "function_call"]
    assert call["name"] == "get_weather"
    status, answer, _ = server.raw("/v1/responses", {"model": server.name, "input": "Search the web.", "tools": tools,
                                                     "tool_choice": {"type": "web_search"}})
    assert status == 400 and "hosted tool 'web_search'" in answer["error"]["message"]
    status, answer, _ = server.raw("/v1/responses", {"model": server.name, "input": "Hi",
                                                     "tools": [{"type": "function"}]})
    assert status == 400 and "tools" in answer["error"]["message"]
