"""An agent framework against a real `edgellm serve`: openai-agents runs a tool round trip through
chat completions and through the Responses API (its default), with the bundled SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_server import Server

agents = pytest.importorskip("agents")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "2")
    yield s
    s.stop()


@pytest.mark.parametrize("api", ["chat completions", "responses"])
def test_an_agent_calls_its_tool_and_answers(server: Server, api: str) -> None:
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    asked: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"21 degrees and sunny in {city}"

    client = AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
    model_class = agents.OpenAIChatCompletionsModel if api == "chat completions" else agents.OpenAIResponsesModel
    agent = agents.Agent(
        name="weather", instructions="Answer with the weather tool.", tools=[get_weather],
        model=model_class(model=server.name, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=96),
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert asked and all(isinstance(city, str) and city for city in asked)
    assert isinstance(result.final_output, str) and result.final_output.strip()
