"""One front door: the same request means the same thing in `edgellm run`, the chat engine and all
four server dialects. At temperature 0 each gives the same text (or the same calls, or the same
refusal) for the same conversation: with and without tools, with a JSON schema, with a model that
has no chat template (Gemma 3 270M, whose fallback transcript needs its stop string), with a context
over the trained length and with a quantized V cache without flash attention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_server import Server

ASK = "What is the capital of France? Answer in one sentence."
N = 40
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]}},
                   "required": ["city"]}}}


def _openai(server: Server, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": ASK}], "max_tokens": N, "temperature": 0, **extra}
    status, answer, _ = server.raw("/v1/chat/completions", body)
    assert status == 200, answer
    message = answer["choices"][0]["message"]
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or ()]
    return {"text": message["content"] or "", "calls": calls}


def _responses(server: Server, **extra) -> dict:
    body = {"input": ASK, "max_output_tokens": N, "temperature": 0, **extra}
    status, answer, _ = server.raw("/v1/responses", body)
    assert status == 200, answer
    text = "".join(part["text"] for item in answer["output"] if item["type"] == "message" for part in item["content"])
    calls = [(i["name"], json.loads(i["arguments"])) for i in answer["output"] if i["type"] == "function_call"]
    return {"text": text, "calls": calls}


def _anthropic(server: Server, **extra) -> dict:
    body = {"messages": [{"role": "user", "content": ASK}], "max_tokens": N, "temperature": 0, **extra}
    status, answer, _ = server.raw("/v1/messages", body)
    assert status == 200, answer
    text = "".join(b["text"] for b in answer["content"] if b["type"] == "text")
    calls = [(b["name"], b["input"]) for b in answer["content"] if b["type"] == "tool_use"]
    return {"text": text, "calls": calls}


def _ollama(server: Server, **extra) -> dict:
    body = {"model": server.name, "messages": [{"role": "user", "content": ASK}], "stream": False,
            "options": {"temperature": 0, "num_predict": N}, **extra}
    status, answer, _ = server.raw("/api/chat", body)
    assert status == 200, answer
    message = answer["message"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ()]
    return {"text": message["content"], "calls": calls}


def _run(cli, model: Path, *args: str) -> dict:
    done = cli("run", str(model), "--temperature", "0", "-n", str(N), "--json", *args, ASK)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    return {"text": answer["response"], "calls": [(c["name"], c["arguments"]) for c in answer.get("tool_calls", ())]}


def _engine(model: Path, **spec) -> dict:
    """The chat engine as a library user (and the app) drives it."""
    from edgellm.options import LoadOptions, SamplingOptions
    from edgellm.runtime.loader import load_model
    from edgellm.runtime.request import GenerationSpec
    from edgellm.runtime.templates import Message

    with load_model(model, LoadOptions(n_ctx=1024)) as loaded:
        ready = loaded.prepare(GenerationSpec((Message("user", ASK),), **spec),
                               SamplingOptions(temperature=0, max_tokens=N))
        text = "".join(chunk.text for chunk in loaded.run(ready))
    content, calls = ready.calls.split(text) if ready.calls else (text, [])
    return {"text": content, "calls": [(c.name, json.loads(c.arguments)) for c in calls]}


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory):
    """`edgellm serve MODEL`, one server per model for the module (one sequence, as `run` has)."""
    started: dict[Path, Server] = {}

    def serve(model: Path) -> Server:
        if model not in started:
            started[model] = Server(tmp_path_factory.mktemp("home"), model, "--parallel", "1")
        return started[model]

    yield serve
    for server in started.values():
        server.stop()


@pytest.fixture()
def smol_server(serving, smollm2: Path) -> Server:
    return serving(smollm2)


@pytest.fixture()
def gemma_server(serving, gemma3: Path) -> Server:
    return serving(gemma3)


def _all_the_same(answers: dict[str, dict]) -> dict:
    first = next(iter(answers.values()))
    assert first["text"] or first["calls"], answers
    for where, answer in answers.items():
        assert answer == first, (where, answers)
    return first


def test_a_plain_question_gets_one_answer(cli, smollm2: Path, smol_server: Server) -> None:
    _all_the_same({"run": _run(cli, smollm2), "engine": _engine(smollm2), "openai": _openai(smol_server),
                   "responses": _responses(smol_server), "anthropic": _anthropic(smol_server),
                   "ollama": _ollama(smol_server)})


def test_a_model_without_a_template_stops_where_its_transcript_does(cli, gemma3: Path, gemma_server: Server) -> None:
    """Gemma 3 270M has no chat template: the fallback transcript ends an answer where the model
    starts the user's next turn. Only `run` stopped there before; the server ran on to the limit."""
    answer = _all_the_same({"run": _run(cli, gemma3), "engine": _engine(gemma3), "openai": _openai(gemma_server),
                            "responses": _responses(gemma_server), "anthropic": _anthropic(gemma_server),
                            "ollama": _ollama(gemma_server)})
    assert "User:" not in answer["text"]


def test_tools_are_offered_and_read_alike(cli, smollm2: Path, smol_server: Server, tmp_path: Path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([TOOL]))
    anthropic_tool = {"name": "get_weather", "description": TOOL["function"]["description"],
                      "input_schema": TOOL["function"]["parameters"]}
    responses_tool = {"type": "function", **TOOL["function"]}
    from edgellm.runtime.tools import Tool

    tool = Tool("get_weather", TOOL["function"]["description"], TOOL["function"]["parameters"])
    for choice in ("auto", "required"):
        answer = _all_the_same({
            "run": _run(cli, smollm2, "--tools", str(tools), "--tool-choice", choice),
            "engine": _engine(smollm2, tools=(tool,), tool_choice=choice),
            "openai": _openai(smol_server, tools=[TOOL], tool_choice=choice),
            "responses": _responses(smol_server, tools=[responses_tool], tool_choice=choice),
            "anthropic": _anthropic(smol_server, tools=[anthropic_tool],
                                    tool_choice={"type": "any" if choice == "required" else "auto"}),
            **({"ollama": _ollama(smol_server, tools=[TOOL])} if choice == "auto" else {}),  # Ollama has no choice
        })
        if choice == "required":
            assert answer["calls"] and answer["calls"][0][0] == "get_weather"


def test_a_json_schema_shapes_every_answer_alike(cli, smollm2: Path, smol_server: Server) -> None:
    answer = _all_the_same({
        "run": _run(cli, smollm2, "--json-schema", json.dumps(SCHEMA)),
        "engine": _engine(smollm2, json_answer=True, json_schema=SCHEMA),
        "openai": _openai(smol_server, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "city", "schema": SCHEMA}}),
        "responses": _responses(smol_server, text={"format": {"type": "json_schema", "name": "city",
                                                              "schema": SCHEMA}}),
        "ollama": _ollama(smol_server, format=SCHEMA),
    })  # Anthropic's API has no way to ask for a format
    assert set(json.loads(answer["text"])) == {"city"}


@pytest.mark.parametrize("args, needle", [
    (("--ctx", "100000"), "context 100000 is longer than the 8192 tokens"),
    (("--kv-type", "f16,q8_0", "--flash-attn", "off"), "a quantized V cache (q8_0) needs flash attention"),
], ids=["over-trained-length", "quantized-v-without-flash-attention"])
def test_settings_llama_cpp_cannot_use_are_refused_alike(cli, smollm2: Path, args: tuple, needle: str) -> None:
    """`run` refused both; `serve` started and answered (flash attention turned on silently)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    done = cli("run", str(smollm2), *args, "hi")
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    serve = subprocess.run([sys.executable, "-m", "edgellm", "serve", str(smollm2), "--port", "1", *args],
                           capture_output=True, text=True, timeout=60,
                           env={**cli_env(cli), "PYTHONPATH": str(ROOT)})
    assert serve.returncode == 2 and needle in serve.stderr and serve.stderr.count("\n") == 1, serve.stderr


def cli_env(cli) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    return {**env, "EDGELLM_HOME": str(cli.home)}
