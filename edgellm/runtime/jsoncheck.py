"""Does a JSON value follow a JSON schema? The check a model's tool-call arguments pass before they
leave edgellm: a grammar holds the model to a schema only when a call is forced, and a model (or a
client's own grammar) can write anything otherwise.

The keywords a grammar can enforce are checked (types, properties, required, additional
properties, items, enum/const, lengths and counts, numeric bounds, anyOf/oneOf/allOf, local
``$ref``); ``pattern`` and ``format`` are not (a client's regex run on model output could take
unbounded time), nor is any keyword this does not know: a check that accepts what it cannot judge.
A schema with no ``type`` takes any value, as llama.cpp reads it.
"""

from __future__ import annotations

import json
import math
from typing import Any

#: how deep a schema may send the check (``$ref`` cycles included)
MAX_DEPTH = 64


class _NotJSON(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """JSON text as Python values, refusing what JSON has no place for: NaN, Infinity, and numbers
    too large to be finite (``1e999``). Raises ValueError."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not _finite(value):
        raise ValueError("a number is not finite")
    return value


def _finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: ((isinstance(v, int) and not isinstance(v, bool))
                          or (isinstance(v, float) and v.is_integer())),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def problem(value: Any, schema: Any, root: Any = None, where: str = "", depth: int = 0) -> str | None:
    """What is wrong with ``value`` under ``schema`` (the first problem found), or None."""
    root = schema if root is None else root
    if depth > MAX_DEPTH:
        return f"{where or 'the value'}: the schema nests too deeply to check"
    if schema is True or schema is None or schema == {}:
        return None
    if schema is False:
        return f"{where or 'the value'} is not allowed"
    if not isinstance(schema, dict):
        return None
    here = where or "the value"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        target = _resolve(ref, root)
        if target is not None:
            found = problem(value, target, root, where, depth + 1)
            if found:
                return found
    kinds = schema.get("type")
    if isinstance(kinds, str):
        kinds = [kinds]
    if isinstance(kinds, list) and kinds and not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
        return f"{here} is not of type {'/'.join(map(str, kinds))}"
    if "const" in schema and not _equal(value, schema["const"]):
        return f"{here} is not {json.dumps(schema['const'])[:60]}"
    if isinstance(schema.get("enum"), list) and not any(_equal(value, e) for e in schema["enum"]):
        return f"{here} is not one of the allowed values"
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and all(
                problem(value, option, root, where, depth + 1) for option in options):
            return f"{here} matches none of {key}"
    for option in schema.get("allOf") or ():
        found = problem(value, option, root, where, depth + 1)
        if found:
            return found
    if isinstance(value, dict):
        return _object(value, schema, root, where, depth)
    if isinstance(value, list):
        return _array(value, schema, root, where, depth)
    if isinstance(value, str):
        return _bounded(len(value), schema, "minLength", "maxLength", f"{here} has {len(value)} characters")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return _number(value, schema, here)
    return None


def _object(value: dict, schema: dict, root: Any, where: str, depth: int) -> str | None:
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    for name in schema.get("required") or ():
        if isinstance(name, str) and name not in value:
            return f"{where or 'the object'} lacks {name!r}"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        path = f"{where}.{name}" if where else name
        if name in properties:
            found = problem(item, properties[name], root, path, depth + 1)
        elif extra is False:
            found = f"{path} is not a known property"
        else:
            found = problem(item, extra, root, path, depth + 1) if isinstance(extra, dict) else None
        if found:
            return found
    return _bounded(len(value), schema, "minProperties", "maxProperties",
                    f"{where or 'the object'} has {len(value)} properties")


def _array(value: list, schema: dict, root: Any, where: str, depth: int) -> str | None:
    prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
    items = schema.get("items")
    for i, item in enumerate(value):
        sub = prefix[i] if i < len(prefix) else items
        found = problem(item, sub, root, f"{where}[{i}]", depth + 1) if isinstance(sub, dict | bool) else None
        if found:
            return found
    return _bounded(len(value), schema, "minItems", "maxItems",
                    f"{where or 'the array'} has {len(value)} items")


def _number(value: float, schema: dict, here: str) -> str | None:
    checks = (("minimum", lambda b: value >= b), ("maximum", lambda b: value <= b),
              ("exclusiveMinimum", lambda b: value > b), ("exclusiveMaximum", lambda b: value < b))
    for key, holds in checks:
        bound = schema.get(key)
        if isinstance(bound, int | float) and not isinstance(bound, bool) and not holds(bound):
            return f"{here} is outside its {key} {bound}"
    return None


def _bounded(count: int, schema: dict, low: str, high: str, what: str) -> str | None:
    least, most = schema.get(low), schema.get(high)
    if isinstance(least, int) and count < least:
        return f"{what}, fewer than {least}"
    if isinstance(most, int) and count > most:
        return f"{what}, more than {most}"
    return None


def _resolve(ref: str, root: Any) -> Any:
    """A local reference (``#/$defs/name``); other references are not followed."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in filter(None, ref[1:].split("/")):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 and 1.0 are equal, True and 1 are not."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b
