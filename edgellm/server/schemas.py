"""Request bodies of the OpenAI API, checked strictly: a wrong type or an out-of-range number is a
400 with the field named, before any model work starts. Unknown fields are ignored, as OpenAI
clients send fields a local server has no use for."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from edgellm.errors import UsageError, brief
from edgellm.runtime.tools import MAX_TOOLS

#: bounds on one request's work, so that no request can hold the server for everyone else
MAX_MESSAGES = 4096
MAX_EMBED_INPUTS = 256
MAX_NAME = 256
MAX_CHOICES = 16  # answers one request may ask for: n, or a list of prompts (times n)


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(Body):
    type: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    text: StrictStr | None = None


def text_of(content: str | list | None, kinds: tuple[str, ...], where: str) -> str:
    """The text of a message's content in any API: a string, or parts of the ``kinds`` that hold
    text; a part of another kind (an image, audio, a file) is refused by name."""
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type not in kinds or part.text is None:
            raise UsageError(f"the served models read text only; {where} has a {brief(part.type)} part",
                             hint="send text parts, or use a model server with vision for images")
    return "".join(part.text for part in content)


class CalledFunction(Body):
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    arguments: StrictStr = "{}"


class ToolCallIn(Body):
    """An earlier call of the assistant's, in the history."""

    id: Annotated[StrictStr, Field(max_length=MAX_NAME)] = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)] | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None

    def text(self) -> str:
        return text_of(self.content, ("text",), "a message")


class FunctionDef(Body):
    name: Annotated[StrictStr, Field(max_length=64)]
    description: StrictStr = ""
    parameters: dict[str, Any] | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Body):
    name: Annotated[StrictStr, Field(max_length=64)]


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Body):
    include_usage: StrictBool = False


class JSONSchemaFormat(Body):
    name: StrictStr = "response"
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0, le=100_000)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: StrictInt | None = None
    max_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    ignore_eos: StrictBool = False  # llama-server's extension: always generate max_tokens (benchmarks)
    logit_bias: Annotated[dict[str, float], Field(max_length=1024)] | None = None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=1 << 20)
    response_format: ResponseFormat | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    tools: Annotated[list[ToolDef], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool = True
    # llama-server's: "none" leaves a reasoning model's <think> block in the content
    reasoning_format: Literal["none", "auto", "deepseek"] = "auto"
    grammar: Annotated[StrictStr, Field(max_length=1 << 20)] | None = None  # llama-server's: a GBNF grammar


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictInt] | Annotated[list[StrictStr], Field(max_length=MAX_CHOICES)]
    max_tokens: StrictInt | None = Field(16, ge=1, le=1 << 20)
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: StrictBool = False


class EmbeddingRequest(Body):
    model: Annotated[StrictStr, Field(max_length=MAX_NAME)] | None = None
    input: (Annotated[StrictStr, Field(min_length=1)]
            | Annotated[list[StrictStr], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
