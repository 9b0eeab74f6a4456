"""One request, whichever way it came: chat, run, the app, or any of the server's four API dialects.

Each front end only translates what it was given into a ``GenerationSpec``; ``prepare()`` is the one
place that turns a spec into what the engine runs: the prompt through the model's template (with
the stop strings that template needs), what shapes the answer, and the rules every tool call the
model writes must pass before it is handed to a client (``CallRules``).

What shapes the answer, one rule for every dialect:

1. ``tool_choice`` "none" offers no tools at all.
2. "required", or a function named, needs tools, and the name must be one of them.
3. At most one of a forced call, a JSON format and a raw grammar shapes an answer; two are refused.
4. Otherwise, with tools offered, a call the model begins is held to the tools' schemas from its
   marker on (a lazy grammar); where a JSON format or grammar shapes the answer instead, calls are
   still read from the answer.

Whatever shaped it, a call leaves only if it names an offered tool and its arguments are a JSON
object that follows that tool's schema; an answer may hold several calls where the format can
write them, unless parallel calls are off (its grammar then ends after one, and a parsed answer
keeps its first); an answer whose calls fail is text. With a forced call, a failing call is an
error (``ToolCallError``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from edgellm.errors import ToolCallError, UsageError
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import GenerationRequest
from edgellm.runtime.grammar import check_grammar, check_schema, json_grammar
from edgellm.runtime.jsoncheck import loads_strict, problem
from edgellm.runtime.templates import ChatTemplate, Message
from edgellm.runtime.text import opens_thinking
from edgellm.runtime.tools import GENERIC, Tool, ToolCall, ToolFormat, call_grammar, check_tools

CHOICES = ("auto", "none", "required", "function")


@dataclass(frozen=True)
class GenerationSpec:
    """What a request asks for, in no API's words."""

    turns: tuple[Message, ...] = ()
    prompt: tuple[int, ...] | None = None  # tokens given whole (a completion, a raw prompt): no template
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # one of CHOICES; "function" names ``tool_name``
    tool_name: str | None = None
    parallel_tool_calls: bool = True
    json_answer: bool = False  # the answer is a JSON value: any object, or ``json_schema``'s
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None  # a client's own GBNF
    grammar_triggers: tuple[str, ...] = ()  # which holds from the first match of these on (lazy)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    #: sampling fields the request sets (SamplingOptions' names); the rest are the defaults
    sampling: Mapping[str, Any] = field(default_factory=dict)
    reasoning: bool = True  # a ``<think>`` block comes apart from the answer
    #: the request fields named in refusals, in the dialect's words
    fields: Mapping[str, str] = field(default_factory=dict)

    def field(self, name: str) -> str:
        return self.fields.get(name, name)


class Target(Protocol):
    """What a spec is prepared for: a loaded model's template, tokenizer and context."""

    template: ChatTemplate

    @property
    def n_ctx(self) -> int: ...

    def prompt_tokens(self, text: str) -> list[int]: ...

    def render(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> str: ...

    def piece(self, token: int) -> bytes: ...


@dataclass(frozen=True)
class CallRules:
    """How the calls in an answer are found and checked: the template's format, the tools
    offered, whether several calls may come in one answer, and whether a call was forced."""

    format: ToolFormat
    tools: tuple[Tool, ...]
    parallel: bool = True
    forced: bool = False
    #: the calls are written under the tools' grammar (forced, or from the format's marker on), so
    #: they can be sent as they are written (toolstream.py); not when another grammar shapes the answer
    held: bool = False

    def split(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a whole answer. Calls that fail the rules leave the answer as
        text, or, when a call was forced, raise ToolCallError."""
        content, calls = self.format.parse(text)
        checked, why = self._checked(calls)
        if why is not None:
            if self.forced:
                raise ToolCallError(f"the model's tool call is not valid: {why}")
            return text, []
        if self.forced and not checked:
            raise ToolCallError("the model did not call a tool, which tool_choice requires")
        return (content if checked else text), checked

    def _checked(self, calls: list[ToolCall]) -> tuple[list[ToolCall], str | None]:
        offered = {tool.name: tool for tool in self.tools}
        out = []
        for call in calls if self.parallel else calls[:1]:
            tool = offered.get(call.name)
            if tool is None:
                return [], f"{call.name[:64]!r} is not one of the tools offered"
            try:
                arguments = loads_strict(call.arguments)
            except ValueError as exc:
                return [], f"the arguments of {call.name} are not JSON ({exc})"
            if not isinstance(arguments, dict):
                return [], f"the arguments of {call.name} are not a JSON object"
            found = problem(arguments, tool.parameters or {"type": "object"})
            if found:
                return [], f"the arguments of {call.name} do not follow its schema: {found}"
            out.append(ToolCall(call.name, json.dumps(arguments, ensure_ascii=False), call.id))
        return out, None


@dataclass(frozen=True)
class Prepared:
    """What the engine runs for a spec, and the rules its answer's calls are read with."""

    prompt: list[int]
    sampling: SamplingOptions
    calls: CallRules | None
    reasoning: bool
    thinking: bool  # the prompt opened a ``<think>`` block already

    def request(self) -> GenerationRequest:
        """A fresh engine request (its ``emit`` set by whoever reads its chunks)."""
        return GenerationRequest(list(self.prompt), self.sampling, lambda _: None, reasoning=self.reasoning,
                                 thinking=self.thinking)


def shaping(spec: GenerationSpec, tool_format: ToolFormat
            ) -> tuple[str | None, tuple[str, ...], CallRules | None]:
    """(grammar, lazy triggers, call rules) of a spec, by the module's rule."""
    for tool in spec.tools:
        _check_parameters(tool, f"{spec.field('tools')} {tool.name!r}")
    choice = spec.tool_choice
    if choice not in CHOICES:
        raise UsageError(f"{spec.field('tool_choice')} {choice!r} is not one of {', '.join(CHOICES)}")
    tools = () if choice == "none" else spec.tools
    check_tools(list(tools))
    forced = choice in ("required", "function")
    if forced and not tools:
        asked = "names a function" if choice == "function" else repr(choice)
        raise UsageError(
            f"{spec.field('tool_choice')} {asked} but the request offers no {spec.field('tools')}")
    if choice == "function" and spec.tool_name not in {t.name for t in tools}:
        raise UsageError(
            f"{spec.field('tool_choice')} names {spec.tool_name!r}, which is not among the tools")
    shapers = [name for name, given in (("tool_choice", forced), ("format", spec.json_answer),
                                        ("grammar", spec.grammar is not None)) if given]
    if len(shapers) > 1:
        both = " and ".join(spec.field(s) for s in shapers)
        raise UsageError(f"{both} cannot both shape the answer; send one")
    rules = CallRules(tool_format, tuple(tools), spec.parallel_tool_calls, forced) if tools else None
    parallel = spec.parallel_tool_calls
    if forced:
        named = spec.tool_name if choice == "function" else None
        return call_grammar(tool_format, list(tools), named, parallel=parallel), (), replace(rules, held=True)
    if spec.json_answer:
        return json_grammar(spec.json_schema, spec.field("format")), (), rules
    if spec.grammar is not None:
        return check_grammar(spec.grammar, spec.field("grammar")), spec.grammar_triggers, rules
    if tools and tool_format.triggers:
        grammar = call_grammar(tool_format, list(tools), after_trigger=True, parallel=parallel)
        return grammar, tool_format.triggers, replace(rules, held=True)
    return None, (), rules


def _check_parameters(tool: Tool, where: str) -> None:
    """A tool's parameters describe the JSON object a call passes (a schema without a type is
    taken as one); anything else could not be called with arguments."""
    schema = tool.parameters
    if schema is None:
        return
    if not isinstance(schema, dict):
        raise UsageError(f"{where}: parameters must be a JSON schema object")
    kind = schema.get("type")
    if kind is not None and kind != "object" and not (isinstance(kind, list) and "object" in kind):
        raise UsageError(f"{where}: parameters must describe a JSON object, not {str(kind)[:40]!r}")
    check_schema(schema, where)


def check(spec: GenerationSpec) -> GenerationSpec:
    """``spec`` unchanged if every model could be asked it (its tools, choice and formats make
    sense and are bounded): what a front end can refuse before loading anything."""
    shaping(spec, GENERIC)
    return spec


def prepare(spec: GenerationSpec, target: Target, defaults: SamplingOptions) -> Prepared:
    """The engine's request for ``spec`` on ``target``: refused here, with the field named, when
    it cannot be answered (the answer's shape, a prompt that does not fit its context)."""
    grammar, triggers, rules = shaping(spec, target.template.tool_format)
    prompt = prompt_for(spec, target)
    n_ctx = target.n_ctx
    if len(prompt) >= n_ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens, which does not fit the {n_ctx}-token context",
                         hint="use a larger --ctx, or start a new conversation",
                         app_hint="choose a larger context in the settings (s), or start a new conversation")
    templated = target.template.stops if spec.prompt is None else ()
    stops = dict.fromkeys((*defaults.stop, *spec.stop, *templated))
    sampling = replace(defaults, **dict(spec.sampling), grammar=grammar, grammar_triggers=triggers,
                       max_tokens=answer_limit(spec.max_tokens, defaults.max_tokens), stop=tuple(stops))
    thinking = spec.reasoning and opens_thinking(target.piece, prompt)
    return Prepared(prompt, sampling, rules, spec.reasoning, thinking)


def answer_limit(asked: int | None, limit: int) -> int:
    """An answer's length limit: what the request asks, capped by the settings' own (``serve -n``
    caps every request, as llama-server's does: agents ask for 32000 tokens a turn)."""
    if asked and asked > 0 and limit > 0:
        return min(asked, limit)
    return asked or limit


def prompt_for(spec: GenerationSpec, target: Target) -> list[int]:
    """The prompt's tokens: the given ones, or the conversation through the model's template with
    the tools it offers (none with tool_choice "none")."""
    if spec.prompt is not None:
        prompt = list(spec.prompt)
    elif spec.turns:
        tools = () if spec.tool_choice == "none" else spec.tools
        prompt = target.prompt_tokens(target.render(spec.turns, tools))
    else:
        raise UsageError(f"the request has no {spec.field('messages')}")
    if not prompt:
        raise UsageError("the prompt is empty")
    return prompt
