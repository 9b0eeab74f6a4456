"""Per-model presets: the settings a person chose for one model in the app (system prompt,
sampling, context, KV types, GPU layers), kept across restarts in ``$EDGELLM_HOME/presets.toml``.

A file of its own, written only by edgellm, so the hand-written ``config.toml`` (and its comments)
is never rewritten. One table per model, by store name::

    ["smollm2-135m-instruct"]
    ctx = 2048
    temperature = 0.3
    system = "Answer in one sentence."

Values are the config file's settings, checked the same way; a model without a table gets the
settings as they are.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.fsutil import atomic_path

FILE = "presets.toml"


def load_presets(home: Path) -> dict[str, dict[str, Any]]:
    """Every model's preset; an unreadable or malformed file is a ConfigError naming it."""
    path = Path(home) / FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    bad = next((name for name, table in data.items() if not isinstance(table, dict)), None)
    if bad is not None:
        raise ConfigError(f"{path}: {bad!r} is not a table of settings")
    return data


def save_preset(home: Path, model: str, values: dict[str, Any]) -> None:
    """Replace ``model``'s preset with ``values`` (None and "" drop a setting); the others stay.
    Written whole to a temporary file and renamed, so a crash never leaves half a file."""
    presets = load_presets(home)
    kept = {k: v for k, v in values.items() if v is not None and v != ""}
    if kept:
        presets[model] = kept
    else:
        presets.pop(model, None)
    path = Path(home) / FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(_toml(presets), encoding="utf-8")


def _toml(presets: dict[str, dict[str, Any]]) -> str:
    """TOML for tables of plain values (JSON's string escapes are TOML's basic-string escapes)."""
    lines = ["# per-model presets, written by edgellm's app (edit with care)"]
    for model, table in sorted(presets.items()):
        lines.append(f"\n[{json.dumps(model)}]")
        for key, value in table.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, (int, float)):
                text = repr(value)
            else:
                text = json.dumps(str(value))
            lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
