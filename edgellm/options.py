"""Plain, stdlib-only descriptions of how to load a model and how to sample from it.

They are separate from ``Settings`` so that library users can build them directly, and so that
the planner, the server and the CLI can validate them without importing llama.cpp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from edgellm.errors import UsageError

#: KV cache types llama.cpp accepts for ``type_k``/``type_v``, as raw ggml type numbers, with
#: bytes per element (block size over elements per block) for memory estimates.
KV_TYPES: dict[str, tuple[int, float]] = {
    "f32": (0, 4.0),
    "f16": (1, 2.0),
    "bf16": (30, 2.0),
    "q8_0": (8, 34 / 32),
    "q4_0": (2, 18 / 32),
    "q4_1": (3, 20 / 32),
    "iq4_nl": (20, 18 / 32),
    "q5_0": (6, 22 / 32),
    "q5_1": (7, 24 / 32),
}

FLASH_ATTN_MODES = ("auto", "on", "off")
#: llama.cpp's LLAMA_DEFAULT_SEED: draw a random seed
DEFAULT_SEED = 0xFFFFFFFF
#: most tokens a draft model may guess at a time (llama.cpp's --draft-max takes as many)
MAX_DRAFT = 64
#: most alternatives a token's log-probabilities list (OpenAI's limit)
MAX_LOGPROBS = 20
#: the context used when none is asked for (or the model's trained length, if shorter)
DEFAULT_CTX = 4096


def kv_type(name: str, allow_auto: bool = False) -> str:
    """Normalise a KV cache type name, refusing unknown ones with the list of valid names."""
    key = name.strip().lower()
    if key == "auto" and allow_auto:
        return key
    if key not in KV_TYPES:
        raise UsageError(
            f"unknown KV cache type {name!r}",
            hint="choose one of " + ", ".join(KV_TYPES),
        )
    return key


def is_quantized_kv(name: str) -> bool:
    return name not in ("f32", "f16", "bf16", "auto") and kv_type(name) not in ("f32", "f16", "bf16")


def default_context(trained: int | None) -> int:
    """The context used when none is asked for: DEFAULT_CTX, or the trained length if shorter."""
    return min(DEFAULT_CTX, trained) if trained else DEFAULT_CTX


def uses_flash_attn(mode: str, type_v: str) -> bool:
    """Whether llama.cpp runs with flash attention: ``auto`` turns it on (every backend we plan for
    has it), and a quantized V cache cannot work without it."""
    return mode != "off" or is_quantized_kv(type_v)


@dataclass(frozen=True)
class LoadOptions:
    """How llama.cpp should load a model: everything that shapes memory and speed."""

    n_ctx: int | None = None  # None: the trained length, at most DEFAULT_CTX; 0: the longest that fits
    n_batch: int = 512
    n_threads: int | None = None  # None: as many as physical cores
    n_gpu_layers: int | None = None  # None: as many as fit (the planner decides); -1: all
    flash_attn: str = "auto"  # auto | on | off
    type_k: str = "f16"  # or "auto": the planner steps down only if the context needs it
    type_v: str = "f16"
    allow_long_context: bool = False
    lora: str | None = None  # a GGUF LoRA adapter applied at load time
    lora_scale: float = 1.0
    rpc: tuple[str, ...] = ()  # RPC workers (host:port) whose devices join the local ones
    tensor_split: tuple[float, ...] = ()  # share of layers per GPU/remote device (default: by free memory)
    draft: str | None = None  # a draft model's GGUF for speculative decoding (same vocabulary, smaller)
    draft_max: int = 16  # most tokens the draft guesses at a time
    draft_p_min: float = 0.75  # a guess the draft is less sure of ends its guessing (llama.cpp's default)

    def __post_init__(self) -> None:
        if self.flash_attn not in FLASH_ATTN_MODES:
            raise UsageError(
                f"unknown flash attention mode {self.flash_attn!r}", hint="use auto, on or off"
            )
        object.__setattr__(self, "type_k", kv_type(self.type_k, allow_auto=True))
        object.__setattr__(self, "type_v", kv_type(self.type_v, allow_auto=True))
        if self.n_ctx is not None and self.n_ctx < 0:
            raise UsageError(f"context length must be positive, got {self.n_ctx}")
        if self.n_batch <= 0:
            raise UsageError(f"batch size must be positive, got {self.n_batch}")
        if self.n_threads is not None and self.n_threads <= 0:
            raise UsageError(f"thread count must be positive, got {self.n_threads}")
        if not 1 <= self.draft_max <= MAX_DRAFT:
            raise UsageError(f"draft max must be 1-{MAX_DRAFT}, got {self.draft_max}")
        if not 0 <= self.draft_p_min <= 1:
            raise UsageError(f"draft p-min must be in [0, 1], got {self.draft_p_min}")


@dataclass(frozen=True)
class SamplingOptions:
    """How each next token is picked, and when an answer ends."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    max_tokens: int = -1  # -1: until end of generation or a full context
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False  # keep going past end-of-generation (benchmarks)
    presence_penalty: float = 0.0  # OpenAI's: lowers every token already in the answer by this much
    frequency_penalty: float = 0.0  # and by this much more per time it occurred
    seed: int = -1  # -1: random; the same seed gives the same answer
    grammar: str | None = None  # GBNF (root rule "root") every answer must follow: JSON, a JSON schema
    grammar_triggers: tuple[str, ...] = ()  # lazy: the grammar holds from the first match of these regexes on
    logprobs: int | None = None  # None: off; n: each token's log-probability and the n likeliest others
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to its logit (-100 bans, 100 forces)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"min-p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise UsageError(f"top-k must be >= 0, got {self.top_k}")
        if self.repeat_penalty <= 0:
            raise UsageError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UsageError(f"{name.replace('_', ' ')} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UsageError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise UsageError("a logit bias must be in [-100, 100]")
        if self.max_tokens == 0 or self.max_tokens < -1:
            raise UsageError(f"max tokens must be positive or -1, got {self.max_tokens}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40}


def parse_size(text: str | int) -> int:
    """``8GiB``, ``512 MiB``, ``1.5g``, ``1000000`` -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 8GiB or 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_endpoints(text: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``host:port,host:port`` -> endpoints, each checked to be host:port."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for part in (p.strip() for p in parts):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"--rpc takes HOST:PORT[,HOST:PORT...], got {part!r}")
        out.append(f"{host}:{int(port)}")
    return tuple(out)
