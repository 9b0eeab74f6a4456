"""Anthropic's Messages API through a real `edgellm serve` and the real anthropic SDK."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_server import Server
from tests.test_tools import WEATHER


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "2")
    yield s
    s.stop()


@pytest.fixture()
def client(server: Server):
    import anthropic

    return anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0)


GREEDY = {"temperature": 0}  # this SDK dropped the argument; the API still takes it
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def test_messages_create(client, server: Server) -> None:
    reply = client.messages.create(model=server.name, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                   system="You are a helpful assistant.")
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.content[0].type == "text" and "Berlin" in reply.content[0].text
    assert reply.stop_reason in ("end_turn", "max_tokens")
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens <= 24


def test_messages_stream_matches_the_whole_answer(client, server: Server) -> None:
    whole = client.messages.create(model=server.name, max_tokens=24, messages=QUESTION, extra_body=GREEDY)
    with client.messages.stream(model=server.name, max_tokens=24, messages=QUESTION, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens


def test_count_tokens(client, server: Server) -> None:
    counted = client.messages.count_tokens(model=server.name, messages=QUESTION)
    reply = client.messages.create(model=server.name, max_tokens=1, messages=QUESTION)
    assert counted.input_tokens == reply.usage.input_tokens > 10


def test_a_forced_tool_use_and_its_result(client, server: Server) -> None:
    tool = {"name": WEATHER["function"]["name"], "description": WEATHER["function"]["description"],
            "input_schema": WEATHER["function"]["parameters"]}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.messages.create(model=server.name, max_tokens=96, messages=ask, tools=[tool], extra_body=GREEDY,
                                   tool_choice={"type": "tool", "name": "get_weather"})
    assert reply.stop_reason == "tool_use"
    (use,) = [block for block in reply.content if block.type == "tool_use"]
    assert use.name == "get_weather" and set(use.input) == {"city", "unit"} and use.id.startswith("toolu_")
    with client.messages.stream(model=server.name, max_tokens=96, messages=ask, tools=[tool], extra_body=GREEDY,
                                tool_choice={"type": "any"}) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].type == "tool_use"
    history = [*ask, {"role": "assistant", "content": [use.model_dump()]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 C, sunny"}]}]
    final = client.messages.create(model=server.name, max_tokens=24, messages=history, tools=[tool], extra_body=GREEDY)
    assert final.content and final.stop_reason in ("end_turn", "max_tokens", "tool_use")


def test_errors_have_the_right_status(client, server: Server) -> None:
    import anthropic

    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="nosuch", max_tokens=4, messages=QUESTION)
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=server.name, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                       "data": "AAAA"}}]}])
    status, body, _ = server.raw("/v1/messages", {"messages": QUESTION})
    assert status == 400 and "max_tokens" in json.dumps(body)


def test_a_stop_sequence_is_named(client, server: Server) -> None:
    reply = client.messages.create(model=server.name, max_tokens=24, messages=QUESTION, extra_body=GREEDY,
                                   stop_sequences=["Berlin"])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "Berlin"
    assert "Berlin" not in reply.content[0].text


THINKING = """{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}<|im_start|>assistant
<think>
"""


def test_thinking_blocks(tmp_path: Path, smollm2: Path) -> None:
    """A template that opens a <think> block for the answer: what the model writes is its thinking,
    as a thinking block, whole and streamed, while the answer is cut inside it (an answer that ends
    without closing the block is text: test_hostile_requests)."""
    import anthropic

    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING)
    server = Server(tmp_path / "home", smollm2, "--template", str(template))
    try:
        client = anthropic.Anthropic(base_url=server.base, api_key="unused", max_retries=0)
        reply = client.messages.create(model=server.name, max_tokens=4, messages=QUESTION, extra_body=GREEDY)
        assert [b.type for b in reply.content] == ["thinking"] and reply.content[0].thinking.strip()
        assert reply.stop_reason == "max_tokens"
        with client.messages.stream(model=server.name, max_tokens=4, messages=QUESTION, extra_body=GREEDY) as stream:
            final = stream.get_final_message()
        assert [b.type for b in final.content] == ["thinking"]
        assert final.content[0].thinking == reply.content[0].thinking
    finally:
        server.stop()


def test_system_messages_among_the_turns_join_the_system_prompt(server: Server) -> None:
    """Claude Code sends a system message inside `messages` with every request (a 400 before)."""
    rules = "Answer in one word."
    inside = {"max_tokens": 16, "temperature": 0, "system": "You are a helpful assistant.",
              "messages": [{"role": "system", "content": [{"type": "text", "text": rules}]}, *QUESTION]}
    joined = {**inside, "system": "You are a helpful assistant.\n\n" + rules, "messages": QUESTION}
    status, first, _ = server.raw("/v1/messages", inside)
    assert status == 200, first
    assert server.raw("/v1/messages", joined)[1]["content"] == first["content"]
    assert server.raw("/v1/messages/count_tokens", inside)[1] == server.raw("/v1/messages/count_tokens", joined)[1]
