"""Chat templates: a conversation in, the prompt text for the model out.

A template is checked and compiled when it is loaded (runtime/jinja.py says how it is bounded),
and rendered in a child process whose memory is capped (runtime/sandbox.py): it is code written
by whoever made the GGUF.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgellm.errors import TemplateError
from edgellm.runtime import sandbox
from edgellm.runtime.jinja import CompiledTemplate
from edgellm.runtime.tools import Tool, ToolCall, ToolFormat, format_for

ROLES = ("system", "user", "assistant", "tool")

#: Used when a model has no chat template (base models such as Gemma 3 270M): a plain
#: transcript, with the next speaker's label left open for the model to continue.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}User: {{ m.content }}\n"
    "{% else %}Assistant: {{ m.content }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
#: where a fallback transcript's answer ends: the model starting the user's next turn
FALLBACK_STOPS = ("\nUser:",)


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class ChatTemplate:
    """A compiled chat template: ``render(messages)`` gives the prompt text for the model."""

    def __init__(self, source: str | None, origin: str = "GGUF") -> None:
        self.is_fallback = not source
        self.source = source or FALLBACK_TEMPLATE
        self.origin = "fallback" if self.is_fallback else origin
        self.stops = FALLBACK_STOPS if self.is_fallback else ()
        CompiledTemplate(self.source, self.origin)  # refused now, not at the first answer

    def render(
        self,
        messages: Sequence[Message | Mapping[str, str]],
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        tools: Sequence[Tool] = (),
    ) -> str:
        """The prompt text for ``messages``, rendered in the memory-capped sandbox process.
        ``tools`` reach the template as its ``tools`` variable (as Hugging Face templates expect);
        a template that does not render tools gets them described in the system message."""
        if tools:
            fmt = format_for(self.source)
            described = fmt.system_prompt(list(tools))
            if described:
                messages = _with_system(list(messages), described)
        data = [_plain_message(m) for m in messages]
        extra = {"tools": [t.as_dict() for t in tools]} if tools else {}
        return sandbox.render(self.source, self.origin, messages=data, add_generation_prompt=add_generation_prompt,
                              bos_token=bos_token, eos_token=eos_token, **extra)

    @property
    def tool_format(self) -> ToolFormat:
        return format_for(self.source)


def _with_system(messages: list, text: str) -> list:
    """``text`` added to the system message, or as one before the conversation."""
    first = messages[0] if messages else None
    role = first.role if isinstance(first, Message) else (first or {}).get("role")
    if role == "system":
        content = first.content if isinstance(first, Message) else first.get("content") or ""
        return [Message("system", f"{content}\n\n{text}" if content else text), *messages[1:]]
    return [Message("system", text), *messages]


def _plain_message(m: Message | Mapping[str, str]) -> dict[str, Any]:
    """Templates receive only plain data (strings, and a call's JSON), whatever the caller passed."""
    role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
    if role not in ROLES:
        raise TemplateError(f"unknown message role {role!r}", hint="use one of " + ", ".join(ROLES))
    if not isinstance(content, str):
        raise TemplateError(f"message content must be text, got {type(content).__name__}")
    plain: dict[str, Any] = {"role": str(role), "content": content}
    if isinstance(m, Message) and m.tool_calls:
        plain["tool_calls"] = [call.as_template() for call in m.tool_calls]
    if isinstance(m, Message) and m.tool_call_id is not None:
        plain["tool_call_id"] = m.tool_call_id
    return plain

