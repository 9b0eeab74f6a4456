"""One Settings object, resolved in a fixed order: CLI > EDGELLM_* environment > config file > defaults.

``EDGELLM_HOME`` moves every path edgellm writes (the model store, the config file, caches).
Settings names are flat (``ctx``, ``kv_type_k``, ``temperature`` ...) and the same in all three
sources: ``--ctx 2048``, ``EDGELLM_CTX=2048``, ``ctx = 2048`` in ``$EDGELLM_HOME/config.toml``.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError, EdgeLLMError
from edgellm.options import LoadOptions, SamplingOptions, parse_endpoints, parse_size

ENV_PREFIX = "EDGELLM_"
MAX_CONFIG = 1 << 20  # bytes: a config file is a few lines


def _int(value: Any) -> int:
    """A whole number, said so plainly when it is not (not Python's "invalid literal for int()")."""
    if isinstance(value, bool):
        raise ValueError("not a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError("not a whole number") from None


def _gpu_layers(value: Any) -> int | None:
    """``auto``: as many as fit (None, for the planner); ``all``: every layer (-1)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return None
    if isinstance(value, str) and value.strip().lower() in ("all", "max"):
        return -1
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError("not a layer count, all or auto") from None
    if n < -1:
        raise ValueError("must be a layer count, all or auto")
    return n


def _ctx(value: Any) -> int:
    """``auto`` (0): the longest context that fits, up to the trained length."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    return _int(value)


def _size(value: Any) -> int:
    return parse_size(value)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _stop(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _rpc(value: Any) -> tuple[str, ...]:
    return parse_endpoints(value) if value else ()


def _floats(value: Any) -> tuple[float, ...]:
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(float(p) for p in parts if str(p).strip())
    except ValueError:
        raise ValueError(f"expected numbers separated by commas, got {value!r}") from None
    if any(x < 0 for x in out):
        raise ValueError("shares cannot be negative")
    return out


def _flash_attn(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value).strip().lower()


# name -> (group, attribute, parser). ``group`` is the Settings attribute holding the value.
_SPEC: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "model": ("", "model", str),
    "system": ("", "system", str),
    "ctx": ("load", "n_ctx", _ctx),
    "batch": ("load", "n_batch", _int),
    "threads": ("load", "n_threads", _int),
    "gpu_layers": ("load", "n_gpu_layers", _gpu_layers),
    "flash_attn": ("load", "flash_attn", _flash_attn),
    "kv_type_k": ("load", "type_k", str),
    "kv_type_v": ("load", "type_v", str),
    "allow_long_context": ("load", "allow_long_context", _bool),
    "lora": ("load", "lora", str),
    "lora_scale": ("load", "lora_scale", float),
    "rpc": ("load", "rpc", _rpc),
    "tensor_split": ("load", "tensor_split", _floats),
    "draft": ("load", "draft", str),
    "draft_max": ("load", "draft_max", _int),
    "draft_p_min": ("load", "draft_p_min", float),
    "temperature": ("sampling", "temperature", float),
    "top_k": ("sampling", "top_k", _int),
    "top_p": ("sampling", "top_p", float),
    "min_p": ("sampling", "min_p", float),
    "repeat_penalty": ("sampling", "repeat_penalty", float),
    "max_tokens": ("sampling", "max_tokens", _int),
    "stop": ("sampling", "stop", _stop),
    "seed": ("sampling", "seed", _int),
    "presence_penalty": ("sampling", "presence_penalty", float),
    "frequency_penalty": ("sampling", "frequency_penalty", float),
    "gpu_memory": ("", "gpu_memory", _size),
    "ram": ("", "ram", _size),
}

SETTING_NAMES = tuple(_SPEC)


def default_home(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("EDGELLM_HOME"):
        return Path(env["EDGELLM_HOME"]).expanduser()
    import platformdirs

    return platformdirs.user_data_path("edgellm", appauthor=False)


@dataclass(frozen=True)
class Settings:
    home: Path
    model: str | None = None
    gpu_memory: int | None = None  # free VRAM to plan for, instead of probing it
    ram: int | None = None  # free RAM to plan for, instead of probing it
    system: str | None = None  # the system prompt a chat starts with
    load: LoadOptions = field(default_factory=LoadOptions)
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def checkpoints_dir(self) -> Path:
        """Hugging Face checkpoints kept for conversion (``edgellm pull`` of a safetensors repo)."""
        return self.home / "checkpoints"

    @property
    def runs_dir(self) -> Path:
        """Fine-tuning runs: each a folder with its checkpoints and, when done, its adapter."""
        return self.home / "runs"

    @property
    def config_file(self) -> Path:
        return self.home / "config.toml"

    @classmethod
    def resolve(
        cls, cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> Settings:
        """Merge defaults, the config file, the environment and CLI values (None means unset)."""
        env = os.environ if env is None else env
        home = default_home(env)
        values: dict[str, tuple[Any, str]] = {}
        for name, value in _read_config_file(home / "config.toml").items():
            values[name] = (value, f"{home / 'config.toml'}: {name}")
        for name in _SPEC:
            key = ENV_PREFIX + name.upper()
            if key in env and env[key] != "":
                values[name] = (env[key], key)
        for name, value in (cli or {}).items():
            if value is not None:
                if name not in _SPEC:
                    raise ConfigError(f"unknown setting {name!r}")
                values[name] = (value, "--" + name.replace("_", "-"))
        return cls._build(home, values)

    @classmethod
    def _build(cls, home: Path, values: Mapping[str, tuple[Any, str]]) -> Settings:
        groups = _parsed(values)
        try:
            load = LoadOptions(**groups["load"])
            sampling = SamplingOptions(**groups["sampling"])
        except EdgeLLMError as exc:
            raise ConfigError(exc.message, exc.hint) from None
        return cls(home=home, load=load, sampling=sampling, **groups[""])


    def with_values(self, values: Mapping[str, Any], source: str,
                    labels: Mapping[str, str] | None = None) -> Settings:
        """These settings with some replaced (a model's preset), each parsed and checked as a value
        of the config file is; ``source`` names where they came from in an error, or ``labels``
        each setting's own place (a field of the app's settings dialog)."""
        unknown = next((name for name in values if name not in _SPEC), None)
        if unknown is not None:
            raise ConfigError(f"{(labels or {}).get(unknown, source)}: unknown setting {unknown!r}")
        groups = _parsed({name: (raw, (labels or {}).get(name, source)) for name, raw in values.items()})
        try:
            load = replace(self.load, **groups["load"])
            sampling = replace(self.sampling, **groups["sampling"])
        except EdgeLLMError as exc:
            raise ConfigError(f"{source}: {exc.message}", exc.hint) from None
        return replace(self, load=load, sampling=sampling, **groups[""])


def _parsed(values: Mapping[str, tuple[Any, str]]) -> dict[str, dict[str, Any]]:
    """Each (raw value, where it came from) parsed into its group's attribute; a value that does
    not parse is a ConfigError naming its source."""
    groups: dict[str, dict[str, Any]] = {"": {}, "load": {}, "sampling": {}}
    for name, (raw, source) in values.items():
        group, attr, parse = _SPEC[name]
        try:
            groups[group][attr] = parse(raw)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid value {raw!r} for {name}: {exc}") from None
    return groups


def _read_config_file(path: Path) -> dict[str, Any]:
    """The config file's settings. It is read only when it is a regular file (a FIFO or a device
    would hang or never end) of at most MAX_CONFIG bytes; whatever else is wrong with it is one line
    naming the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        raw = os.read(fd, MAX_CONFIG + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG:
        raise ConfigError(f"config file {path} is over {MAX_CONFIG >> 10} KiB")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests too deeply") from None
    unknown = sorted(set(data) - set(_SPEC))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting {unknown[0]!r}",
            hint="known settings: " + ", ".join(_SPEC),
        )
    return data
