"""One chat template compiled by MiniJinja, with a bounded amount of work per render.

A GGUF's ``tokenizer.chat_template`` is code written by whoever made the file. MiniJinja (a Rust
Jinja2 implementation) shows templates plain data only, never Python objects, so
``''.__class__.__mro__`` leads nowhere; a template that names Python internals is refused
outright; and MiniJinja's *fuel* stops a template that loops forever after a fixed number of
instructions (about 0.1 s of work), which a wall-clock alarm cannot do for code that holds the
GIL. The rendered text is capped in size too. Memory is capped by rendering in the sandbox's
child process, which is the one caller of ``render``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from edgellm.errors import TemplateError

#: MiniJinja instructions a render may use; ~2M is well under a second on any machine, and the
#: longest real templates need a few thousand per message
FUEL = 2_000_000
#: largest prompt text a template may produce (characters); contexts are far smaller than this
MAX_OUTPUT_CHARS = 4 << 20

_DUNDER = re.compile(r"__[A-Za-z0-9_]+__")
_TAG = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


def _raise_exception(message: str) -> None:
    from minijinja import TemplateError as MiniJinjaError

    raise MiniJinjaError(str(message))


def _strftime_now(fmt: str) -> str:
    return time.strftime(str(fmt))


class CompiledTemplate:
    """A template checked and compiled, or a TemplateError saying why it cannot be."""

    def __init__(self, source: str, origin: str) -> None:
        from minijinja import Environment
        from minijinja import TemplateError as MiniJinjaError

        self.origin = origin
        for tag in _TAG.findall(source):
            found = _DUNDER.search(tag)
            if found:
                raise TemplateError(
                    f"the {origin} chat template was refused: it reaches for Python internals ({found.group(0)})",
                    hint="use a trusted template with --template FILE",
                )
        # a template file's own final newline is not part of the prompt, as Hugging Face and llama.cpp render it
        self._env = Environment(fuel=FUEL, keep_trailing_newline=False)
        self._env.add_function("raise_exception", _raise_exception)
        self._env.add_function("strftime_now", _strftime_now)
        try:
            self._env.add_template("chat", source)
        except MiniJinjaError as exc:
            raise TemplateError(
                f"the {origin} chat template does not compile: {_first_line(exc)}",
                hint="use a working template with --template FILE",
            ) from None

    def render(self, **variables: Any) -> str:
        from minijinja import TemplateError as MiniJinjaError

        try:
            text = self._env.render_template("chat", **variables)
        except MiniJinjaError as exc:
            detail = _first_line(exc)
            if "out of fuel" in detail:
                detail = "it ran too long and was stopped (a template must not loop without end)"
            raise TemplateError(f"the {self.origin} chat template failed: {detail}") from None
        if len(text) > MAX_OUTPUT_CHARS:
            raise TemplateError(
                f"the {self.origin} chat template produced {len(text)} characters, over the limit of {MAX_OUTPUT_CHARS}"
            )
        return text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
