"""Chat templates from GGUF files, rendered in a sandbox with a bounded amount of work.

A GGUF's ``tokenizer.chat_template`` is code written by whoever made the file. We render it with
MiniJinja (a Rust Jinja2 implementation): templates see plain data only, never Python objects,
so ``''.__class__.__mro__`` leads nowhere; a template that names Python internals is refused
outright; and MiniJinja's *fuel* stops a template that loops forever after a fixed number of
instructions (about 0.1 s of work), which a wall-clock alarm cannot do for code that holds the
GIL. The rendered prompt is capped in size as well, and memory too: rendering happens in a child
process whose address space is capped (runtime/sandbox.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from edgellm.errors import TemplateError

#: MiniJinja instructions a render may use; ~2M is well under a second on any machine, and the
#: longest real templates need a few thousand per message
FUEL = 2_000_000
#: largest prompt text a template may produce (characters); contexts are far smaller than this
MAX_OUTPUT_CHARS = 4 << 20
ROLES = ("system", "user", "assistant", "tool")

_DUNDER = re.compile(r"__[A-Za-z0-9_]+__")
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.S)

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

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def _raise_exception(message: str) -> None:
    from minijinja import TemplateError as MiniJinjaError

    raise MiniJinjaError(str(message))


def _strftime_now(fmt: str) -> str:
    return time.strftime(str(fmt))


class ChatTemplate:
    """A compiled chat template: ``render(messages)`` gives the prompt text for the model."""

    def __init__(self, source: str | None, origin: str = "GGUF") -> None:
        from minijinja import Environment
        from minijinja import TemplateError as MiniJinjaError

        self.is_fallback = not source
        self.source = source or FALLBACK_TEMPLATE
        self.origin = "fallback" if self.is_fallback else origin
        self.stops = FALLBACK_STOPS if self.is_fallback else ()
        for tag in _TAG.findall(self.source):
            found = _DUNDER.search(tag)
            if found:
                raise TemplateError(
                    f"the {self.origin} chat template was refused: it reaches for Python "
                    f"internals ({found.group(0)})",
                    hint="use a trusted template with --template FILE",
                )
        self._env = Environment(fuel=FUEL, keep_trailing_newline=True)
        self._env.add_function("raise_exception", _raise_exception)
        self._env.add_function("strftime_now", _strftime_now)
        try:
            self._env.add_template("chat", self.source)
        except MiniJinjaError as exc:
            raise TemplateError(
                f"the {self.origin} chat template does not compile: {_first_line(exc)}",
                hint="use a working template with --template FILE",
            ) from None

    def render(
        self,
        messages: Sequence[Message | Mapping[str, str]],
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
    ) -> str:
        """The prompt text for ``messages``, rendered in the memory-capped sandbox process."""
        from edgellm.runtime import sandbox

        data = [_plain_message(m) for m in messages]
        return sandbox.render(self.source if not self.is_fallback else "", self.origin, messages=data,
                              add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)

    def render_here(self, messages: list[dict[str, str]], add_generation_prompt: bool, bos_token: str,
                    eos_token: str) -> str:
        """Render in this process: only the sandbox's child calls this."""
        from minijinja import TemplateError as MiniJinjaError

        try:
            text = self._env.render_template(
                "chat",
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
            )
        except MiniJinjaError as exc:
            detail = _first_line(exc)
            if "out of fuel" in detail:
                detail = "it ran too long and was stopped (a template must not loop without end)"
            raise TemplateError(f"the {self.origin} chat template failed: {detail}") from None
        if len(text) > MAX_OUTPUT_CHARS:
            raise TemplateError(
                f"the {self.origin} chat template produced {len(text)} characters, "
                f"over the limit of {MAX_OUTPUT_CHARS}"
            )
        return text


def _plain_message(m: Message | Mapping[str, str]) -> dict[str, str]:
    """Templates receive only plain strings, whatever the caller passed."""
    role, content = (m.role, m.content) if isinstance(m, Message) else (m.get("role"), m.get("content"))
    if role not in ROLES:
        raise TemplateError(f"unknown message role {role!r}", hint="use one of " + ", ".join(ROLES))
    if not isinstance(content, str):
        raise TemplateError(f"message content must be text, got {type(content).__name__}")
    return {"role": str(role), "content": content}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
