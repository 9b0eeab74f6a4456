"""A reasoning model's <think>…</think> comes apart from its answer: in the runtime's Chunks, in
the OpenAI API (reasoning_content, as llama-server sends it). The model
is made to think by a grammar (llama-server's `grammar` field), so the test needs no reasoning model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgellm.runtime.text import ThinkSplitter
from tests.test_server import Server

THOUGHT = "The user asks about Germany."
GRAMMAR = f'root ::= "<think>\\n{THOUGHT}\\n</think>\\n\\n" [A-Z] [a-z ]{{3,12}} "."'
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def _split(pieces: list[str], thinking: bool = False) -> tuple[str, str]:
    splitter, answer, reasoning = ThinkSplitter(thinking), "", ""
    for piece in pieces:
        a, r = splitter.feed(piece)
        answer, reasoning = answer + a, reasoning + r
    a, r = splitter.flush()
    return answer + a, reasoning + r


@pytest.mark.parametrize("cut", range(1, 46))
def test_tags_split_anywhere_in_the_stream(cut: int) -> None:
    text = "<think>\nI should greet.\n</think>\n\nHello there"
    assert _split([text[:cut], text[cut:]]) == ("Hello there", "I should greet.\n")


def test_what_is_not_a_think_block_stays_the_answer() -> None:
    assert _split(["Hello <think>no</think>"]) == ("Hello <think>no</think>", "")
    assert _split(["<thi"]) == ("<thi", "")
    assert _split(["\nPlanned.</think>Answer"], thinking=True) == ("Answer", "Planned.")
    assert _split(["Unfinished thought"], thinking=True) == ("", "Unfinished thought")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2)
    yield s
    s.stop()


def test_openai_reasoning_content(server: Server) -> None:
    ask = {"model": server.name, "messages": QUESTION, "max_tokens": 64, "temperature": 0, "grammar": GRAMMAR}
    status, body, _ = server.raw("/v1/chat/completions", ask)
    assert status == 200, body
    message = body["choices"][0]["message"]
    assert message["reasoning_content"].strip() == THOUGHT and "<think>" not in message["content"]
    assert message["content"].endswith(".") and not message["content"].startswith("\n")
    status, kept, _ = server.raw("/v1/chat/completions", {**ask, "reasoning_format": "none"})
    assert kept["choices"][0]["message"]["content"].startswith("<think>")
    stream = server.client().chat.completions.create(**{k: v for k, v in ask.items() if k != "grammar"},
                                                      extra_body={"grammar": GRAMMAR}, stream=True)
    thought, content = "", ""
    for chunk in stream:
        for choice in chunk.choices:
            thought += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
    assert thought.strip() == THOUGHT and content == message["content"]


def test_chunks_of_chat_and_run_carry_the_thinking(model) -> None:
    """The runtime behind chat, run and the app: thinking arrives in Chunk.reasoning, not in the text."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.templates import Message

    chunks = list(model.chat([Message("user", "What is the capital of Germany?")],
                             SamplingOptions(temperature=0, max_tokens=64, grammar=GRAMMAR)))
    assert "".join(c.reasoning for c in chunks).strip() == THOUGHT
    text = "".join(c.text for c in chunks)
    assert "<think>" not in text and text.endswith(".") and text[0].isupper()
