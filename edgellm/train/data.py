"""Training data: a JSONL file in one of the formats people have, checked line by line, into token
rows whose loss mask says which tokens the model learns.

The formats are a registry (``FORMATS``), each known by its keys:

- ``messages``: ``{"messages": [...], "tools": [...]?}``, OpenAI chat (tool calls included),
  rendered with the model's own chat template; the loss is on the assistant turns only.
- ``alpaca``: ``{"instruction", "input"?, "output"}``, made a two-turn chat (instruction and input
  as the user's turn), so it trains the model as it will be prompted.
- ``prompt-completion``: ``{"prompt", "completion"}``, plain text as TRL takes it: the loss on
  the completion (and the end-of-text token after it) only.
- ``text``: ``{"text"}``, plain text, every token learned.

Which tokens an assistant turn owns is found by rendering the conversation up to each turn (with
and without it) and cutting the full rendering at those points, so any template works whose
rendering of a conversation starts with its rendering of each earlier part. A template that
rewrites earlier turns (Qwen3 drops old reasoning) makes one example per assistant turn instead.
The file is untrusted: it must be a regular file, lines are bounded, and a bad line is refused by
its number before anything is trained.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import DataError, EdgeLLMError, TemplateError, brief
from edgellm.fsutil import open_regular

#: longest line a data file may have (bytes): a conversation of a few thousand tokens is ~20 KiB
MAX_LINE = 4 << 20
#: most examples one file may hold
MAX_EXAMPLES = 2_000_000
#: most messages one conversation may hold
MAX_MESSAGES = 1000


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text, and whether the model learns it."""

    text: str
    trained: bool


Render = Callable[[Sequence[Any], bool, Sequence[Any]], str]


class RecordFormat:
    """One JSONL shape: the keys that name it, and how a record of it becomes text segments."""

    name = ""
    keys: frozenset[str] = frozenset()
    chat = False  # rendered with the chat template

    def sequences(self, record: dict[str, Any], line: int, render: Render, eos: str) -> list[list[Segment]]:
        raise NotImplementedError

    def matches(self, record: dict[str, Any]) -> bool:
        return self.keys <= record.keys()


def _text(record: dict[str, Any], key: str, line: int, *, empty: bool = False) -> str:
    value = record.get(key, "")
    if not isinstance(value, str):
        raise DataError(f"line {line}: {key} is {type(value).__name__}, not text")
    if not empty and not value.strip():
        raise DataError(f"line {line}: {key} is empty")
    return value


class TextFormat(RecordFormat):
    name = "text"
    keys = frozenset({"text"})

    def sequences(self, record: dict[str, Any], line: int, render: Render, eos: str) -> list[list[Segment]]:
        return [[Segment(_text(record, "text", line) + eos, True)]]


class PromptCompletionFormat(RecordFormat):
    name = "prompt-completion"
    keys = frozenset({"prompt", "completion"})

    def sequences(self, record: dict[str, Any], line: int, render: Render, eos: str) -> list[list[Segment]]:
        prompt, completion = _text(record, "prompt", line, empty=True), _text(record, "completion", line)
        return [[Segment(prompt, False), Segment(completion + eos, True)]]


class MessagesFormat(RecordFormat):
    name = "messages"
    keys = frozenset({"messages"})
    chat = True

    def sequences(self, record: dict[str, Any], line: int, render: Render, eos: str) -> list[list[Segment]]:
        return chat_sequences(
            _messages(record.get("messages"), line), _tools(record.get("tools"), line), render, line
        )


class AlpacaFormat(RecordFormat):
    name = "alpaca"
    keys = frozenset({"instruction", "output"})
    chat = True

    def sequences(self, record: dict[str, Any], line: int, render: Render, eos: str) -> list[list[Segment]]:
        from edgellm.runtime.templates import Message

        instruction, extra = _text(record, "instruction", line), _text(record, "input", line, empty=True)
        system = _text(record, "system", line, empty=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [Message("system", system)] if system.strip() else []
        messages += [Message("user", user), Message("assistant", _text(record, "output", line))]
        return chat_sequences(messages, (), render, line)


#: every format, most specific first (a record with "messages" and "text" is a conversation)
FORMATS: dict[str, RecordFormat] = {
    f.name: f for f in (MessagesFormat(), AlpacaFormat(), PromptCompletionFormat(), TextFormat())
}


def detect(record: dict[str, Any], line: int) -> RecordFormat:
    for fmt in FORMATS.values():
        if fmt.matches(record):
            return fmt
    keys = ", ".join(sorted(map(str, record))[:8]) or "none"
    raise DataError(
        f"line {line}: unknown data format (keys: {brief(keys, 120)})",
        hint="use messages, prompt+completion, instruction+output (Alpaca) or text",
    )


def _messages(value: Any, line: int) -> list[Any]:
    from edgellm.runtime.templates import ROLES, Message
    from edgellm.runtime.tools import ToolCall

    if not isinstance(value, list) or not value:
        raise DataError(f"line {line}: messages must be a non-empty list")
    if len(value) > MAX_MESSAGES:
        raise DataError(f"line {line}: {len(value)} messages, over the limit of {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(value, 1):
        where = f"line {line}: message {i}"
        if not isinstance(m, dict):
            raise DataError(f"{where} is {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {brief(role)}", hint="use " + ", ".join(ROLES))
        content = _content(m.get("content"), where)
        calls = []
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            arguments = fn.get("arguments", {}) if isinstance(fn, dict) else None
            if not isinstance(name, str) or not name or not isinstance(arguments, (str, dict)):
                raise DataError(f"{where}: a tool call needs function.name and function.arguments")
            if isinstance(arguments, str):
                try:
                    json.loads(arguments)
                except ValueError:
                    raise DataError(
                        f"{where}: tool call {brief(name)} has arguments that are not JSON"
                    ) from None
            # a call without an id gets one from its place: the same file renders the same tokens every
            # time (a resumed run must see the data it started with)
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            calls.append(ToolCall(name, text, str(call.get("id") or f"call_{line}_{i}_{len(calls)}")))
        if role != "assistant" and calls:
            raise DataError(f"{where}: only assistant messages make tool calls")
        if not content and not calls and role in ("user", "assistant"):
            raise DataError(f"{where}: {role} message is empty")
        out.append(
            Message(role, content, tuple(calls), str(m["tool_call_id"]) if m.get("tool_call_id") else None)
        )
    if not any(m.role == "assistant" for m in out):
        raise DataError(f"line {line}: no assistant message to learn from")
    return out


def _content(value: Any, where: str) -> str:
    """Text, or OpenAI's list of text parts joined."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise DataError(f"{where}: content must be text or a list of text parts")


def _tools(value: Any, line: int) -> tuple[Any, ...]:
    from edgellm.runtime.tools import Tool

    if value is None:
        return ()
    tools = []
    for t in value if isinstance(value, list) else [None]:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise DataError(f"line {line}: tools must be a list of functions with a name")
        params = fn.get("parameters")
        tools.append(
            Tool(fn["name"], str(fn.get("description") or ""), params if isinstance(params, dict) else None)
        )
    return tuple(tools)


def chat_sequences(
    messages: Sequence[Any], tools: Sequence[Any], render: Render, line: int
) -> list[list[Segment]]:
    """The conversation as one example whose assistant turns are learned, or (for a template that
    rewrites earlier turns) one example per assistant turn, learning that turn."""
    turns = [i for i, m in enumerate(messages) if m.role == "assistant"]
    try:
        full = render(messages, False, tools)
        cuts = [(render(messages[:i], True, tools), render(messages[: i + 1], False, tools)) for i in turns]
    except TemplateError as exc:
        raise DataError(
            f"line {line}: the chat template cannot render this conversation: {exc.message}"
        ) from None
    for before, through in cuts:
        if not through.startswith(before) or not through[len(before) :]:
            raise DataError(
                f"line {line}: the chat template does not render an assistant turn after its prompt",
                hint="use prompt/completion records for this model",
            )
    if all(full.startswith(through) for _, through in cuts) and all(
        len(cuts[k][1]) <= len(cuts[k + 1][0]) for k in range(len(cuts) - 1)
    ):
        segments, pos = [], 0
        for before, through in cuts:
            segments += [
                Segment(full[pos : len(before)], False),
                Segment(full[len(before) : len(through)], True),
            ]
            pos = len(through)
        return [[s for s in [*segments, Segment(full[pos:], False)] if s.text]]
    return [
        [s for s in (Segment(before, False), Segment(through[len(before) :], True)) if s.text]
        for before, through in cuts
    ]


# -- reading the file ------------------------------------------------------------------------------
def records(path: Path, digest: Any = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for every line of a JSONL file, each checked as it is read; ``digest``
    (a hashlib object) takes in the bytes read, so the data is read once for its identity too."""
    try:
        fh = open_regular(Path(path))
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
    with fh:
        number = 0
        while raw := fh.readline(MAX_LINE + 1):
            number += 1
            if digest is not None:
                digest.update(raw)
            if len(raw) > MAX_LINE:
                raise DataError(f"{path}: line {number} is over {MAX_LINE >> 20} MiB")
            if number > MAX_EXAMPLES:
                raise DataError(f"{path}: over {MAX_EXAMPLES} lines")
            if not raw.strip():
                raise DataError(f"{path}: line {number} is empty")
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {number} is not UTF-8 text (byte {exc.start})") from None
            except RecursionError:
                raise DataError(f"{path}: line {number} nests too deeply") from None
            except ValueError as exc:
                raise DataError(f"{path}: line {number} is not JSON: {exc}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}: line {number} is a JSON {type(record).__name__}, not an object")
            yield number, record
        if number == 0:
            raise DataError(f"data file {path} is empty")


# -- tokens ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """Token ids and, for each, whether it is a target the loss is taken on."""

    ids: tuple[int, ...]
    trained: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Examples:
    """A data file made ready to train on, with what became of it (shown before training)."""

    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)
    trained_tokens: int = 0
    masked_tokens: int = 0
    cut: int = 0  # examples shortened to the longest length
    dropped: int = 0  # examples with nothing to learn (after cutting)
    template: str = ""
    sha256: str = ""  # the file's: a run's record, and what a resumed run must see again

    @property
    def tokens(self) -> int:
        return self.trained_tokens + self.masked_tokens

    def split(self, held: int, seed: int) -> tuple[Examples, Examples]:
        """(the rest, ``held`` examples drawn at random by ``seed``): a held-out set for the eval loss
        that a file sorted by topic does not skew. Each has its own token counts."""
        import random

        chosen = set(random.Random(seed).sample(range(len(self.examples)), held))
        rest = [e for i, e in enumerate(self.examples) if i not in chosen]
        kept = [e for i, e in enumerate(self.examples) if i in chosen]
        return self._with(rest), self._with(kept)

    def _with(self, examples: list[Example]) -> Examples:
        learned = sum(sum(e.trained[1:]) for e in examples)
        return Examples(self.path, self.format, examples, learned, sum(map(len, examples)) - learned,
                        template=self.template, sha256=self.sha256)

    def summary(self) -> str:
        share = 100 * self.trained_tokens / max(self.tokens, 1)
        text = (
            f"{self.path.name}: {len(self.examples)} examples ({self.format}), {self.tokens} tokens, "
            f"{self.trained_tokens} trained ({share:.0f}%), {self.masked_tokens} masked"
        )
        notes = [f"{self.cut} cut to --max-len"] if self.cut else []
        notes += [f"{self.dropped} with nothing to learn left out"] if self.dropped else []
        return text + (f"; {', '.join(notes)}" if notes else "")


class Tokens:
    """What data needs of a model's tokenizer and template: text to ids with character offsets,
    and a conversation to text. Built from a checkpoint folder (``for_checkpoint``)."""

    def __init__(self, tokenizer: Any, template: Any) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.bos = tokenizer.bos_token or ""
        self.eos = tokenizer.eos_token or ""
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.adds_bos = bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id

    @classmethod
    def for_checkpoint(cls, folder: Path) -> Tokens:
        from edgellm.runtime.templates import ChatTemplate

        tokenizer = load_tokenizer(folder)
        return cls(tokenizer, ChatTemplate(checkpoint_template(folder), "checkpoint"))

    def render(self, messages: Sequence[Any], generation_prompt: bool, tools: Sequence[Any]) -> str:
        if "tool_calls" not in self.template.source:  # it would drop the calls: write them as the model would
            messages = [_calls_as_text(m, self.template.tool_format) for m in messages]
        return self.template.render(
            messages,
            add_generation_prompt=generation_prompt,
            bos_token=self.bos,
            eos_token=self.eos,
            tools=tools,
        )

    def encode(self, segments: Sequence[Segment], chat: bool) -> Example:
        text = "".join(s.text for s in segments)
        prefix = self.bos if self.adds_bos and not chat else ""
        encoded = self.tokenizer(prefix + text, add_special_tokens=False, return_offsets_mapping=True)
        bounds, pos = [], len(prefix)
        for s in segments:
            bounds.append((pos, pos + len(s.text), s.trained))
            pos += len(s.text)
        trained = []
        for start, end in encoded["offset_mapping"]:
            trained.append(
                any(lo <= start < hi and learn for lo, hi, learn in bounds) if end > start else False
            )
        return Example(tuple(encoded["input_ids"]), tuple(trained))


def _calls_as_text(message: Any, fmt: Any) -> Any:
    from dataclasses import replace

    if not message.tool_calls:
        return message
    text = fmt.write(list(message.tool_calls))
    return replace(message, content=f"{message.content}\n{text}" if message.content else text, tool_calls=())


def load_tokenizer(folder: Path) -> Any:
    """The checkpoint's own tokenizer (a fast one: offsets are what find each turn's tokens)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds for a folder it cannot read
        raise DataError(f"cannot load the tokenizer of {folder}: {type(exc).__name__}: {exc}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{folder} has no fast tokenizer (tokenizer.json), which training needs")
    return tokenizer


def checkpoint_template(folder: Path) -> str | None:
    """The chat template a checkpoint ships (chat_template.jinja, or tokenizer_config.json's), or
    None: the base model is then trained on edgellm's plain transcript, as it will chat."""
    folder = Path(folder)
    try:
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    except FileNotFoundError:
        pass
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {folder / 'chat_template.jinja'}: {exc}") from None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise DataError(f"cannot read {folder / 'tokenizer_config.json'}: {exc}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return template if isinstance(template, str) else None


def prepare(
    path: Path, tokens: Tokens, max_len: int, on_line: Callable[[int], None] | None = None
) -> Examples:
    """Every line read, checked, rendered and tokenized, cut to ``max_len`` tokens. One format per
    file (the first line's); any bad line stops it here, before a model is loaded."""
    path = Path(path)
    out: Examples | None = None
    fmt: RecordFormat | None = None
    digest = hashlib.sha256()
    for number, record in records(path, digest):
        if fmt is None:
            fmt = detect(record, number)
            out = Examples(path, fmt.name, template=tokens.template.origin if fmt.chat else "")
        elif not fmt.matches(record):
            raise DataError(f"{path}: line {number} is not in the file's format ({fmt.name}, from line 1)")
        try:
            sequences = fmt.sequences(record, number, tokens.render, tokens.eos)
        except DataError as exc:
            raise DataError(f"{path}: {exc.message}", exc.hint) from None
        except EdgeLLMError as exc:
            raise DataError(f"{path}: line {number}: {exc.message}", exc.hint) from None
        for segments in sequences:
            example = tokens.encode(segments, fmt.chat)
            if len(example) > max_len:
                example = Example(example.ids[:max_len], example.trained[:max_len])
                out.cut += 1
            learned = sum(example.trained[1:])  # the first token is never a target
            if not learned:
                out.dropped += 1
                continue
            out.examples.append(example)
            out.trained_tokens += learned
            out.masked_tokens += len(example) - learned
        if on_line is not None:
            on_line(number)
    assert out is not None  # records() refuses an empty file
    out.sha256 = digest.hexdigest()
    if not out.examples:
        raise DataError(f"{path}: no example has anything to learn within --max-len {max_len}")
    return out


# -- rows --------------------------------------------------------------------------------------------
def packed_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Examples (by index) packed into rows of at most ``max_len`` tokens, first fit by decreasing
    length: few rows, little padding. Each example keeps its own positions and attends only to
    itself (see loop.collate)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def padding_share(lengths: Sequence[int], batch: int, max_len: int) -> tuple[float, float]:
    """The share of computed tokens that would be padding, padded (each batch to its longest) and
    packed: what ``--pack auto`` decides by."""
    real = sum(lengths)
    padded = sum(
        max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch)
    )
    rows = packed_rows(lengths, max_len)
    packed_total = sum(
        max(sum(lengths[i] for i in row) for row in rows[k : k + batch]) * len(rows[k : k + batch])
        for k in range(0, len(rows), batch)
    )
    return 1 - real / max(padded, 1), 1 - real / max(packed_total, 1)
