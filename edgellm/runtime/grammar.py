"""Constrained answers: JSON, or JSON following a schema, as a GBNF grammar llama.cpp samples under.

The conversion is llama-cpp-python's port of llama.cpp's own json-schema-to-grammar. Every grammar
passes ``check_grammar`` before llama.cpp parses it, and every schema ``check_schema`` before it is
converted: llama.cpp's GBNF parser recurses once per nested group, and the converter writes a
bounded repetition (``maxLength``, ``{0,n}`` in a pattern, ``maxItems``) as that many nested
optional groups, so a request that controlled either could make the parser overflow its thread's
stack, which kills the whole server. The bounds are far above what real schemas use; a maximum
above them (Claude Code's tools allow strings of 512k characters) is left out of the grammar and
held by the check every answer passes after it is generated (jsoncheck.py), while a minimum above
them, which no grammar could make a model write, is refused.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edgellm.errors import UsageError

#: most copies one repetition may ask for (maxLength, maxItems, a pattern's {m,n}, ...)
MAX_REPEAT = 1000
#: how deep groups may nest inside one grammar rule, and schemas inside schemas
MAX_NESTING = MAX_REPEAT + 64
MAX_SCHEMA_DEPTH = 64
#: most schema nodes one request's schemas may hold, and the size of a grammar llama.cpp parses
MAX_SCHEMA_NODES = 20_000
MAX_GRAMMAR = 512 << 10
#: most rules one grammar may define (llama.cpp follows references recursively to find left recursion)
MAX_RULES = 8192

_MINIMA = ("minLength", "minItems", "minProperties", "minContains")
_MAXIMA = ("maxLength", "maxItems", "maxProperties", "maxContains")
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def json_grammar(schema: dict[str, Any] | None = None, where: str = "the JSON schema") -> str:
    """A grammar for any JSON object (``schema`` None), or for JSON matching ``schema``; ``where``
    names the request field a refusal points at."""
    from edgellm.runtime.native import json_object_grammar, schema_grammar

    if schema is None:
        return json_object_grammar()
    if not isinstance(schema, dict) or not schema:
        raise UsageError(f"{where} must be a non-empty JSON object")
    check_schema(schema, where)
    try:
        grammar = schema_grammar(json.dumps(for_grammar(schema)))
    except Exception as exc:  # the converter raises plain exceptions for schemas it cannot express
        raise UsageError(f"{where} is not supported: {exc}") from None
    return check_grammar(grammar, where)


def check_schema(schema: Any, where: str = "the JSON schema") -> None:
    """Refuse a schema whose grammar would be too deep or too large, naming the field: minimum counts
    over MAX_REPEAT (and negative counts), patterns that repeat more, nesting past MAX_SCHEMA_DEPTH,
    too many nodes."""
    seen = 0
    stack: list[tuple[Any, str, int]] = [(schema, where, 0)]
    while stack:
        node, path, depth = stack.pop()
        seen += 1
        if seen > MAX_SCHEMA_NODES:
            raise UsageError(f"{where} has more than {MAX_SCHEMA_NODES} parts")
        if depth > MAX_SCHEMA_DEPTH:
            raise UsageError(f"{path} nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        for key in (*_MINIMA, *_MAXIMA):
            value = node.get(key)
            counted = isinstance(value, int | float) and not isinstance(value, bool)
            if counted and not 0 <= value <= (MAX_REPEAT if key in _MINIMA else float("inf")):
                raise UsageError(f"{path}.{key} is {_shown(value)}; at most {MAX_REPEAT} can be enforced")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            _check_pattern(pattern, f"{path}.pattern")
        stack.extend((value, f"{path}.{key}", depth + 1) for key, value in node.items()
                     if isinstance(value, dict | list))


#: keywords that say what a schema takes; a schema with none of them (only a description, say)
#: takes any JSON value, as llama.cpp's own converter reads it (the binding's port refuses it)
_SHAPING = {"type", "$ref", "enum", "const", "oneOf", "anyOf", "allOf", "not", "properties", "items",
            "prefixItems", "additionalProperties", "pattern", "format", "minLength", "maxLength", "minItems",
            "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "required"}
_ANY = {"type": ["object", "array", "string", "number", "boolean", "null"]}


def for_grammar(schema: Any) -> Any:
    """``schema`` as the grammar holds it: every subschema that says nothing of its value's shape
    made "any JSON value" (Claude Code's tools have properties with only a description), and
    maxima over MAX_REPEAT left out (the answer's check holds them)."""
    if not isinstance(schema, dict):
        return schema
    if not _SHAPING & schema.keys():
        return {**schema, **_ANY}
    out = {key: value for key, value in schema.items()
           if not (key in _MAXIMA and isinstance(value, int | float) and value > MAX_REPEAT)}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: for_grammar(sub) for name, sub in schema[key].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            out[key] = [for_grammar(sub) for sub in schema[key]]
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = for_grammar(schema[key])
    return out


def _check_pattern(pattern: str, where: str) -> None:
    if len(pattern) > 4096:
        raise UsageError(f"{where} is longer than 4096 characters")
    for match in _QUANTIFIER.finditer(pattern):
        for number in match.groups():
            if number and int(number) > MAX_REPEAT:
                raise UsageError(f"{where} repeats {int(number)} times; at most {MAX_REPEAT} can be enforced")
    depth = deepest = 0
    for char in pattern:
        depth += (char == "(") - (char == ")")
        deepest = max(deepest, depth)
    if deepest > MAX_SCHEMA_DEPTH:
        raise UsageError(f"{where} nests groups deeper than {MAX_SCHEMA_DEPTH}")


def check_grammar(grammar: str, where: str = "grammar") -> str:
    """``grammar`` unchanged if llama.cpp can parse it without a risk to the process: at most
    MAX_GRAMMAR bytes, MAX_RULES rules, groups nested at most MAX_NESTING deep and repetitions
    ``{m,n}`` of at most MAX_REPEAT. A linear scan that knows GBNF's strings, character classes and
    comments (llama.cpp's parser says what else is wrong, once it is safe to ask it)."""
    if len(grammar.encode()) > MAX_GRAMMAR:
        raise UsageError(f"{where} is over {MAX_GRAMMAR >> 10} KiB")
    depth = deepest = rules = 0
    i, n = 0, len(grammar)
    while i < n:
        char = grammar[i]
        if char == '"' or char == "[":
            i = _skip_literal(grammar, i, '"' if char == '"' else "]")
            continue
        if char == "#":
            end = grammar.find("\n", i)
            i = n if end < 0 else end
            continue
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
        elif char == "{":
            match = _QUANTIFIER.match(grammar, i)
            if match:
                for number in match.groups():
                    if number and int(number) > MAX_REPEAT:
                        raise UsageError(
                            f"{where} repeats {int(number)} times; at most {MAX_REPEAT} can be enforced")
        elif char == ":" and grammar.startswith("::=", i):
            rules += 1
            depth = 0  # a rule's groups close before the next rule (llama.cpp refuses the grammar otherwise)
        i += 1
    if deepest > MAX_NESTING:
        raise UsageError(f"{where} nests groups {deepest} deep; at most {MAX_NESTING}")
    if rules > MAX_RULES:
        raise UsageError(f"{where} has {rules} rules; at most {MAX_RULES}")
    return grammar


def _skip_literal(text: str, start: int, close: str) -> int:
    """The index after a string or character class that opens at ``start`` (escapes skipped)."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == close:
            return i + 1
        i += 1
    return i


def _shown(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e18 else repr(value)
