"""One error hierarchy: every error edgellm raises is a type in errors.py, and one table says what
each front end shows for it."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from edgellm import errors

PACKAGE = Path(errors.__file__).parent
CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.EdgeLLMError)]


def test_every_error_has_a_row() -> None:
    assert {c for c in CLASSES} == set(errors.SHOWN)


def test_errors_are_defined_in_errors_py_only() -> None:
    names = {c.__name__ for c in CLASSES}
    elsewhere = [
        f"{path.relative_to(PACKAGE)}: {node.name}"
        for path in PACKAGE.rglob("*.py") if path.name != "errors.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) in names for b in node.bases)
    ]
    assert not elsewhere


@pytest.mark.parametrize(("error", "exit_code", "status", "code"), [
    (errors.UsageError, 2, 400, "invalid_request"),
    (errors.ConfigError, 2, 400, "invalid_config"),
    (errors.ModelNotFoundError, 1, 404, "model_not_found"),
    (errors.QueueFullError, 1, 503, "server_busy"),
    (errors.TruncatedGGUFError, 1, 500, "truncated_gguf"),
    (errors.HubUnreachableError, 1, 504, "hub_unreachable"),
    (errors.Cancelled, 130, 499, "cancelled"),
])
def test_what_each_front_end_shows(error: type, exit_code: int, status: int, code: str) -> None:
    exc = error("message", hint="hint")
    assert (exc.exit_code, exc.http_status, exc.code, str(exc)) == (exit_code, status, code, "message (hint)")


def test_an_unlisted_error_shows_as_its_nearest_base() -> None:
    class Narrower(errors.TruncatedGGUFError):
        pass

    assert errors.shown(Narrower("x")) == errors.SHOWN[errors.TruncatedGGUFError]
