"""The one streaming contract: the runtime yields Chunks; chat, the TUI and the server consume them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    """What one answer cost, measured on the wall clock around llama.cpp.

    ``prompt_ms`` runs until the first answer token is sampled (prompt evaluation); decode speed
    counts the tokens sampled after it over the time they took, as llama.cpp's own eval timing does.
    """

    prompt_tokens: int
    cached_tokens: int
    prompt_ms: float
    generated_tokens: int
    decode_steps: int
    generate_ms: float
    draft_tokens: int = 0  # speculative decoding: guesses the draft model made
    draft_accepted: int = 0  # and how many of them the model's sampling kept

    @property
    def prompt_per_second(self) -> float | None:
        evaluated = self.prompt_tokens - self.cached_tokens
        return evaluated / self.prompt_ms * 1000 if self.prompt_ms > 0 and evaluated > 0 else None

    @property
    def tokens_per_second(self) -> float | None:
        return self.decode_steps / self.generate_ms * 1000 if self.generate_ms > 0 else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_second": _round(self.prompt_per_second),
            "generated_tokens": self.generated_tokens,
            "generate_ms": round(self.generate_ms, 3),
            "tokens_per_second": _round(self.tokens_per_second),
            "draft_tokens": self.draft_tokens,
            "draft_accepted": self.draft_accepted,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability, and the most likely alternatives (token, text, logprob)."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class Chunk:
    """A piece of an answer. The last chunk of every answer has a ``finish_reason`` and timings.

    ``finish_reason`` is ``stop`` (end of generation or a stop string), ``length`` (max tokens or
    a full context) or ``cancelled`` (the caller asked to stop).
    """

    text: str
    token: int | None = None
    finish_reason: str | None = None
    timings: Timings | None = None
    logprobs: TokenLogprob | None = None
    reasoning: str = ""  # a reasoning model's thinking, split from its answer (``<think>…</think>``)
    stop: str | None = None  # on the last chunk: the stop string that ended the answer, if one did
    #: on the last chunk: the answer ended inside a ``<think>`` block it never closed, so this chunk's
    #: text is all it wrote (already streamed as reasoning): the answer, where a client reads only text
    unclosed_thought: bool = False


def joined(chunks: list[Chunk]) -> tuple[str, str]:
    """(text, reasoning) of a whole answer. An answer that never closed its thinking is text alone:
    its last chunk carries all of it."""
    text = "".join(c.text for c in chunks)
    if chunks and chunks[-1].unclosed_thought:
        return text, ""
    return text, "".join(c.reasoning for c in chunks)
