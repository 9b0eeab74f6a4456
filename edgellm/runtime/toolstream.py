"""Tool calls read as they are written, so a streamed answer sends a call's name as soon as it is
known and its arguments as the model writes them, as OpenAI and Anthropic stream theirs.

A ``CallStream`` takes the answer's text piece by piece. Text before the format's marker is the
answer's content, sent at once except for a tail that could still become the marker. From the
marker on, the text is scanned as JSON: every object at the format's call depth is a call, its
``name`` string read whole, its arguments' JSON text passed on character by character. The
answer is still read whole when it ends (``CallRules.split``): ``settle()`` says whether the calls
sent while streaming are the ones that pass the checks, so a front end never leaves a client with
calls the non-streamed answer would not have had.

A call's name leaves only if it is one of the tools offered (the grammar makes it one, unless the
marker began mid-token and the text stayed free); once a name is not, no call is sent and the rest
of the answer goes out as text when it ends, as the non-streamed answer would have it. Formats
without a marker (Llama 3's bare JSON) cannot be told from text until the answer ends, and are not
streamed this way (``streams()``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from edgellm.runtime.request import CallRules
from edgellm.runtime.tools import ToolCall


@dataclass(frozen=True)
class Content:
    """Answer text that is not a call."""

    text: str


@dataclass(frozen=True)
class CallBegun:
    """A call's name is known: the ``index``-th call of the answer."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    """More of a call's arguments (JSON text; the pieces joined are the arguments)."""

    index: int
    text: str


Event = Content | CallBegun | CallArguments


def streams(rules: CallRules | None) -> bool:
    """Whether an answer read with ``rules`` can send its calls as they are written: its format has
    a marker and the tools' grammar holds the calls (under a client's own grammar they are read
    whole, and a call that fails the checks is text)."""
    return rules is not None and rules.held and bool(rules.format.marker)


class CallStream:
    """One answer's text in, Content and call events out."""

    def __init__(self, rules: CallRules) -> None:
        fmt = rules.format
        self.rules = rules
        self._marker = re.compile(fmt.triggers[0])
        self._compact_marker = fmt.marker
        self._call_depth = fmt.call_depth
        self._depth = fmt.opened_depth
        self.text = ""  # everything fed
        self._sent = 0  # how much of the text before the marker went out as content
        self._marked = False  # the marker was seen: the rest is calls
        self.calls: list[list[str]] = []  # [id, name, arguments sent] of each call begun
        self._call: _Call | None = None  # the call object being read
        self._offered = {tool.name for tool in rules.tools}
        self.refused = False  # a call named no tool offered: nothing more is sent as a call
        self._in_string = self._escaped = False

    # -- feeding ---------------------------------------------------------------------------------
    def feed(self, piece: str) -> list[Event]:
        start = len(self.text)
        self.text += piece
        events: list[Event] = []
        if not self._marked:
            match = self._marker.search(self.text, max(self._sent - len(self._compact_marker) - 64, 0))
            if match is None:
                return self._content(self._held_from())
            self._marked, start = True, match.end()
            events = self._content(match.start())
        for i in range(start, len(self.text)):
            self._step(i, self.text[i], events)
        if self._call is not None:
            self._flush(self._call, events)
        return _merged(events)

    def close(self) -> list[Event]:
        """The held tail, once the answer ends without a marker there."""
        return [] if self._marked else self._content(len(self.text))

    def _held_from(self) -> int:
        """Where the tail that could still be the start of the marker begins."""
        first = self._compact_marker[0]
        i = self.text.find(first, max(self._sent, len(self.text) - 4 * len(self._compact_marker)))
        while i != -1:
            if self._compact_marker.startswith(re.sub(r"\s+", "", self.text[i:])):
                return i
            i = self.text.find(first, i + 1)
        return len(self.text)

    def _content(self, end: int) -> list[Event]:
        if end <= self._sent:
            return []
        text, self._sent = self.text[self._sent : end], end
        return [Content(text)]

    # -- the JSON after the marker -----------------------------------------------------------------
    def _step(self, i: int, char: str, events: list[Event]) -> None:
        call = self._call
        if self._in_string:
            if self._escaped:
                self._escaped = False
            elif char == "\\":
                self._escaped = True
            elif char == '"':
                self._in_string = False
                if call is not None and self._depth == call.depth:
                    self._string_ended(call, i)
            return
        if call is not None and self._depth == call.depth:
            self._member(call, i, char, events)
        elif char == '"':
            self._in_string = True
        elif char in "{[":
            if (
                char == "{"
                and call is None
                and self._depth == self._call_depth
                and (self.rules.parallel or not self.calls)
            ):
                self._call = _Call(self._depth + 1)
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
            if call is not None and self._depth == call.depth and call.expect == "container":
                call.value_ended(i + 1, self._arguments_key)

    def _member(self, call: _Call, i: int, char: str, events: list[Event]) -> None:
        """A character directly inside a call object: keys, and where each value begins and ends."""
        if call.expect == "primitive" and char in ",}":
            call.value_ended(i, self._arguments_key)
        if char.isspace():
            return
        if call.expect in ("key", "comma") and char == "}":
            self._depth -= 1
            self._flush(call, events)
            self._call = None
        elif call.expect == "key" and char == '"':
            self._in_string, call.expect, call.string_start = True, "key-string", i + 1
        elif call.expect == "colon" and char == ":":
            call.expect = "value"
        elif call.expect == "comma" and char == ",":
            call.expect = "key"
        elif call.expect == "value":
            if call.key == self._arguments_key:
                call.arguments_start = i
            if char == '"':
                self._in_string, call.expect, call.string_start = True, "value-string", i + 1
            elif char in "{[":
                self._depth += 1
                call.expect = "container"
            else:
                call.expect = "primitive"

    def _string_ended(self, call: _Call, i: int) -> None:
        raw = self.text[call.string_start : i]
        if call.expect == "key-string":
            call.key, call.expect = _decoded(raw), "colon"
            return
        if call.key == "name" and call.name is None:
            call.name = _decoded(raw)
        call.value_ended(i + 1, self._arguments_key)

    @property
    def _arguments_key(self) -> str:
        return self.rules.format.arguments_key

    def _flush(self, call: _Call, events: list[Event]) -> None:
        """Send what is known of a call: its name once whole, then its arguments written since."""
        if call.name is None or self.refused:
            return
        if call.name not in self._offered:
            self.refused = True
            return
        if call.index is None:
            call.index = len(self.calls)
            self.calls.append(["call_" + uuid.uuid4().hex[:24], call.name, ""])
            events.append(CallBegun(call.index, self.calls[-1][0], call.name))
        if call.arguments_start is None:
            return
        arguments = self.text[call.arguments_start : call.arguments_end or len(self.text)]
        sent = self.calls[call.index]
        if len(arguments) > len(sent[2]):
            events.append(CallArguments(call.index, arguments[len(sent[2]) :]))
            sent[2] = arguments

    # -- the end -------------------------------------------------------------------------------------
    def settle(self, cut: bool = False) -> tuple[str, list[ToolCall], bool]:
        """(content, calls, agreed) of the whole answer by the checks every answer passes, the calls
        carrying the ids sent; ``agreed``: the calls sent while streaming are these calls (for an
        answer ``cut`` by its length: they begin with these, the last one unfinished)."""
        content, calls = self.rules.split(self.text)
        if len(calls) != len(self.calls) and not (cut and len(calls) < len(self.calls)):
            return content, calls, False
        settled = []
        for call, (call_id, name, arguments) in zip(calls, self.calls, strict=False):
            try:
                same = call.name == name and json.loads(call.arguments) == json.loads(arguments)
            except (json.JSONDecodeError, RecursionError):
                same = False
            if not same:
                return content, calls, False
            settled.append(ToolCall(call.name, call.arguments, call_id))
        return content, settled, True

    def unsent_content(self, content: str) -> str:
        """What of the settled content did not go out while streaming: text after the calls, or
        all that followed the text sent when the calls turned out to be text."""
        sent = self.text[: self._sent]
        if content == self.text:
            return content[len(sent) :]
        return content[len(sent.strip()) :].strip() if content.startswith(sent.strip()) else ""


@dataclass
class _Call:
    """A call object being read: what its members' scan expects next, and what it found."""

    depth: int  # the depth of the object's members
    expect: str = "key"  # key, key-string, colon, value, value-string, container, primitive, comma
    key: str | None = None
    string_start: int = 0
    name: str | None = None
    arguments_start: int | None = None  # where the arguments' JSON text begins and ends in the answer
    arguments_end: int | None = None
    index: int | None = None

    def value_ended(self, end: int, arguments_key: str) -> None:
        if self.key == arguments_key and self.arguments_start is not None and self.arguments_end is None:
            self.arguments_end = end
        self.expect = "comma"


def _decoded(raw: str) -> str:
    try:
        return json.loads('"' + raw + '"')
    except json.JSONDecodeError:
        return raw


def _merged(events: list[Event]) -> list[Event]:
    """Neighbouring pieces of one kind joined (a piece of text makes one event of each kind)."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, CallArguments) and isinstance(last, CallArguments) and last.index == event.index:
            out[-1] = CallArguments(event.index, last.text + event.text)
        else:
            out.append(event)
    return out
