"""Tool calling: the tools reach the chat template, the model's answer comes back as calls.

Models are trained to call tools in their own format, which their chat template shows: Hermes and
Qwen wrap a JSON call in ``<tool_call>`` tags, Mistral writes ``[TOOL_CALLS]`` and a JSON list,
Llama 3.x a bare JSON object with ``parameters``. Each is a ``ToolFormat`` in the registry, picked
from the template; a template with no tool support gets the tools described in the system message
and answers in a generic JSON format. A call that must happen (``tool_choice`` "required", or a
function named) is generated under a grammar made from the functions' JSON schemas, so even a
small model produces a valid call. With "auto" the model decides: a grammar for what follows the
format's marker waits until the model writes the marker (a lazy grammar), so text stays free and a
call, once begun, is valid.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from json.decoder import WHITESPACE
from typing import Any

from edgellm.errors import UsageError, brief

#: most tools one request may offer (each becomes grammar rules and prompt text)
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its parameters' JSON schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """As chat templates and OpenAI clients know it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters or {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is JSON text, as the OpenAI API carries it."""

    name: str
    arguments: str
    id: str = ""

    @classmethod
    def new(cls, name: str, arguments: Any) -> ToolCall:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls(name, text, "call_" + uuid.uuid4().hex[:24])

    def as_template(self) -> dict[str, Any]:
        """As chat templates expect a call in the history (arguments as an object)."""
        try:
            arguments = json.loads(self.arguments)
        except json.JSONDecodeError:
            arguments = self.arguments
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


class ToolFormat:
    """How one family of models writes calls."""

    name = ""
    arguments_key = "arguments"
    #: regexes whose first match starts a call; what follows is rest()'s (none: no lazy grammar)
    triggers: tuple[str, ...] = ()
    #: the first trigger as written without spaces (none: calls cannot be told apart as they stream),
    #: the JSON depth after it, and the depth at which an object is a call (toolstream.py)
    marker = ""
    opened_depth = 0
    call_depth = 0

    def detect(self, template: str) -> bool:
        raise NotImplementedError

    def system_prompt(self, tools: list[Tool]) -> str | None:
        """Text describing the tools, for templates that do not render them themselves."""
        return None

    #: GBNF for the marker that starts the calls, for what follows it around the rule ``calls``,
    #: and for what stands between two calls (None: the format holds one call only)
    head = ""
    body = "tc-ws calls"
    between: str | None = None

    def wrap(self, parallel: bool = False) -> str:
        """The grammar's root and its ``calls``: the marker and one call, or as many as the model
        writes with ``parallel``."""
        return self._rules(" ".join(part for part in (self.head, self.body) if part), parallel)

    def rest(self, parallel: bool = False) -> str:
        """The same for what follows the marker (a trigger), up to the end of the calls."""
        return self._rules(self.body, parallel)

    def _rules(self, root: str, parallel: bool) -> str:
        more = f" (tc-ws {self.between} tc-ws call)*" if parallel and self.between else ""
        return f"root ::= {root}\ncalls ::= call{more}"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(the text that is not a call, the calls) of an answer."""
        raise NotImplementedError

    def write(self, calls: list[ToolCall]) -> str:
        """The text a model of this family writes for ``calls`` (what parse() reads back): how a
        fine-tuning example teaches calls to a model whose template does not render them."""
        return "\n".join(f"<tool_call>\n{json.dumps(self._object(c), ensure_ascii=False)}\n</tool_call>"
                         for c in calls)

    def _object(self, call: ToolCall) -> dict[str, Any]:
        return {"name": call.name, self.arguments_key: call.as_template()["function"]["arguments"]}

    def _calls(self, objects: list[Any]) -> list[ToolCall]:
        calls = []
        for obj in objects:
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                calls.append(ToolCall.new(obj["name"], obj.get(self.arguments_key, {})))
        return calls


FORMATS: list[ToolFormat] = []


def register(cls: type[ToolFormat]) -> type[ToolFormat]:
    FORMATS.append(cls())
    return cls


@register
class Hermes(ToolFormat):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Hermes, Qwen 2.5 and 3, SmolLM3."""

    name = "hermes"
    triggers = ("<tool_call>",)
    marker = "<tool_call>"
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)

    def detect(self, template: str) -> bool:
        return "<tool_call>" in template

    head = '"<tool_call>"'
    body = 'tc-ws calls tc-ws "</tool_call>"'
    between = '"</tool_call>" tc-ws "<tool_call>"'

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        bodies = self._CALL.findall(text)
        calls = self._calls([_loads(body) for body in bodies])
        return (self._CALL.sub("", text).strip() if calls else text), calls


@register
class Mistral(ToolFormat):
    """``[TOOL_CALLS][{"name": ..., "arguments": {...}}]``: Mistral's instruct models."""

    name = "mistral"
    triggers = (r"\[TOOL_CALLS\]",)
    marker = "[TOOL_CALLS]"
    call_depth = 1  # in its list

    def detect(self, template: str) -> bool:
        return "[TOOL_CALLS]" in template

    head = '"[TOOL_CALLS]"'
    body = 'tc-ws "[" tc-ws calls tc-ws "]"'
    between = '","'

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        head, marker, rest = text.partition("[TOOL_CALLS]")
        if not marker:
            return text, []
        calls = self._calls(_listed(rest))
        return (head.strip() if calls else text), calls

    def write(self, calls: list[ToolCall]) -> str:
        return "[TOOL_CALLS]" + json.dumps([self._object(c) for c in calls], ensure_ascii=False)


@register
class Llama3(ToolFormat):
    """A bare ``{"name": ..., "parameters": {...}}``: Llama 3.1 to 3.3."""

    name = "llama3"
    arguments_key = "parameters"  # a bare JSON call has no marker to wait for: "auto" is parsed only

    def detect(self, template: str) -> bool:
        return "<|python_tag|>" in template or ("ipython" in template and "parameters" in template)


    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix("<|python_tag|>")
        calls = self._calls([_loads(body)]) if body.startswith("{") else []
        return ("" if calls else text), calls

    def write(self, calls: list[ToolCall]) -> str:
        return "<|python_tag|>" + json.dumps(self._object(calls[0]), ensure_ascii=False) if calls else ""


class Generic(ToolFormat):
    """For templates that know no tools: the tools are described in the system message, and a
    call is the JSON object ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``."""

    name = "generic"
    triggers = (r'\{\s*"tool_calls"\s*:',)
    marker = '{"tool_calls":'
    opened_depth, call_depth = 1, 2  # in the object's list

    def detect(self, template: str) -> bool:
        return True

    def system_prompt(self, tools: list[Tool]) -> str:
        listed = "\n".join(json.dumps(t.as_dict()["function"], ensure_ascii=False) for t in tools)
        return ("You can call these functions:\n" + listed + '\nTo call one, answer only with JSON: '
                '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}')

    head = '"{" tc-ws "\\"tool_calls\\"" tc-ws ":"'
    body = 'tc-ws "[" tc-ws calls tc-ws "]" tc-ws "}"'
    between = '","'

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Text before the object is the answer's content (its lazy grammar starts at the marker)."""
        match = re.search(self.triggers[0], text)
        calls = self._calls(_listed(text[match.end():])) if match else []
        return (text[:match.start()].strip() if calls else text), calls

    def write(self, calls: list[ToolCall]) -> str:
        return json.dumps({"tool_calls": [self._object(c) for c in calls]}, ensure_ascii=False)


GENERIC = Generic()


def format_for(template: str) -> ToolFormat:
    """The format the model's chat template shows it calls tools in; generic when it shows none."""
    return next((f for f in FORMATS if f.detect(template)), GENERIC)


def call_grammar(fmt: ToolFormat, tools: list[Tool], name: str | None = None, after_trigger: bool = False,
                 parallel: bool = False) -> str:
    """GBNF for one call in ``fmt`` (as many as the model writes with ``parallel``, where the format
    holds several), each of the function ``name`` or any of ``tools``, its arguments following the
    function's JSON schema; ``after_trigger``: from after the marker."""
    from edgellm.runtime.grammar import json_grammar

    chosen = [t for t in tools if name is None or t.name == name]
    if not chosen:
        raise UsageError(f"tool_choice names {brief(name)}, which is not among the tools")
    schema = {"oneOf": [{"type": "object", "properties": {"name": {"const": t.name},
                                                           fmt.arguments_key: t.parameters or {"type": "object"}},
                         "required": ["name", fmt.arguments_key]} for t in chosen]}
    rules = json_grammar(schema).replace("root ::=", "call ::=", 1)
    # the markers around a call take any whitespace: a lazy grammar replays the text of the token
    # that completed the marker, which a model may end with a newline
    return (fmt.rest(parallel) if after_trigger else fmt.wrap(parallel)) + '\ntc-ws ::= [ \\t\\n]*\n' + rules


def check_tools(tools: list[Tool]) -> None:
    if len(tools) > MAX_TOOLS:
        raise UsageError(f"{len(tools)} tools, more than the {MAX_TOOLS} one request may offer")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise UsageError("two tools have the same name")
    for tool in tools:
        if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", tool.name):
            raise UsageError(f"tool name {brief(tool.name)} must be 1-64 letters, digits, _ . : or -")


def _listed(text: str) -> list[Any]:
    """The objects of the JSON list ``text`` begins with, up to the first that is not whole (an
    answer cut by its length keeps the calls it completed)."""
    decoder = json.JSONDecoder()
    rest = text.lstrip()
    if not rest.startswith("["):
        return [found] if isinstance(found := _loads(rest), dict) else []
    found, at = [], 1
    while True:
        try:
            item, at = decoder.raw_decode(rest, WHITESPACE.match(rest, at).end())
        except (json.JSONDecodeError, RecursionError):
            return found
        found.append(item)
        at = WHITESPACE.match(rest, at).end()
        if rest[at:at + 1] != ",":
            return found
        at += 1


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
