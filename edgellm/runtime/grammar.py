"""Constrained answers: JSON, or JSON following a schema, as a GBNF grammar llama.cpp samples under.

The conversion is llama-cpp-python's port of llama.cpp's own json-schema-to-grammar.
"""

from __future__ import annotations

import json
from typing import Any

from edgellm.errors import UsageError


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """A grammar for any JSON object (``schema`` None), or for JSON matching ``schema``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None:
        return JSON_GBNF
    if not isinstance(schema, dict) or not schema:
        raise UsageError("a JSON schema must be a non-empty JSON object")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises plain exceptions for schemas it cannot express
        raise UsageError(f"the JSON schema is not supported: {exc}") from None
