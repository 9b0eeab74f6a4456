"""Turning sampled tokens into text: byte pieces, whole UTF-8 characters, stop strings, answers."""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence

from edgellm.options import SamplingOptions
from edgellm.runtime.chunks import Chunk, Timings, TokenLogprob


class StopScanner:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        if not self.stops:
            return buf, False
        at = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (at < 0 or i < at):
                at, self.matched = i, stop
        if at >= 0:
            self.held = ""
            return buf[:at], True
        cut = len(buf)  # where the held-back tail begins
        for stop in self.stops:
            cut = min(cut, self._partial(buf, stop))
        self.held = buf[cut:]
        return buf[:cut], False

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Where the longest end of ``buf`` that begins ``stop`` starts (``len(buf)`` if none).
        Found from the stop's first character, which is rarely in the text (``<`` of a special
        token), in one C search in the common case: this runs for every token."""
        i = buf.find(stop[0], max(len(buf) - len(stop) + 1, 0))
        while i >= 0 and not stop.startswith(buf[i:]):
            i = buf.find(stop[0], i + 1)
        return len(buf) if i < 0 else i

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Splits a reasoning model's ``<think>…</think>`` from its answer as the text streams in
    (Qwen3, DeepSeek-R1 distills), holding back what could be the start of a tag. ``thinking``:
    the prompt already opened the block (templates that end their generation prompt with it)."""

    def __init__(self, thinking: bool = False) -> None:
        self.state = "inside" if thinking else "start"  # start: the answer may still open a block
        self.held = ""
        self.thought = ""  # all the reasoning given out so far
        self._trim = thinking  # the newlines around a tag are the tag's, not the text's

    def feed(self, text: str) -> tuple[str, str]:
        """(answer text, reasoning text) of the text so far."""
        buf, self.held = self.held + text, ""
        answer, reasoning = "", ""
        while buf:
            if self.state == "start":
                stripped = buf.lstrip()
                if stripped.startswith(THINK_OPEN):
                    self.state, self._trim, buf = "inside", True, stripped[len(THINK_OPEN):]
                    continue
                if THINK_OPEN.startswith(stripped):
                    self.held = buf
                    break
                self.state = "after"
            elif self.state == "inside":
                if self._trim:
                    buf = buf.lstrip("\n")
                    self._trim = not buf
                    continue
                end = buf.find(THINK_CLOSE)
                if end >= 0:
                    reasoning += buf[:end]
                    self.state, self._trim, buf = "after", True, buf[end + len(THINK_CLOSE):]
                    continue
                keep = next((k for k in range(min(len(THINK_CLOSE) - 1, len(buf)), 0, -1)
                             if buf.endswith(THINK_CLOSE[:k])), 0)
                reasoning, self.held = reasoning + buf[: len(buf) - keep], buf[len(buf) - keep:]
                break
            else:
                if self._trim:
                    buf = buf.lstrip()
                    self._trim = not buf
                answer += buf
                break
        self.thought += reasoning
        return answer, reasoning

    def flush(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.state == "inside":
            self.thought += held
            return "", held
        return held, ""

    @property
    def unclosed(self) -> bool:
        """The block is still open: the model never wrote its end."""
        return self.state == "inside"


def opens_thinking(piece: Callable[[int], bytes], prompt: Sequence[int]) -> bool:
    """Whether a rendered prompt ends inside a ``<think>`` block its template opened."""
    tail = b"".join(piece(t) for t in prompt[-8:]).decode("utf-8", errors="replace")
    return tail.rstrip().endswith(THINK_OPEN)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share from the start: what a KV cache can reuse. Found by
    comparing slices (in C) and halving, as it runs every step on whole contexts."""
    a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Answer:
    """One answer as it streams: sampled tokens become Chunks of whole UTF-8 text, stopping at the
    end of generation, a stop string or ``limit`` tokens, and ending with a Chunk carrying timings.

    The single-sequence runtime and the batched server both feed their tokens through this, so
    they stop, hold back text and time answers the same way.
    """

    def __init__(
        self,
        piece: Callable[[int], bytes],
        is_end: Callable[[int], bool],
        sampling: SamplingOptions,
        prompt_tokens: int,
        cached_tokens: int,
        limit: int,
        reasoning: ThinkSplitter | None = None,
    ) -> None:
        """``reasoning``: split a reasoning model's thinking from its answer (Chunk.reasoning)."""
        self._piece = piece
        self._is_end = is_end
        self._ignore_eos = sampling.ignore_eos
        self._undecoded = b""  # the start of a UTF-8 character a token's piece split
        self._scanner = StopScanner(sampling.stop)
        self._reasoning = reasoning
        self._hit_stop = False
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.limit = limit
        self.generated = 0
        self.sampled = 0
        self.draft_tokens = 0  # guesses a draft model proposed (speculative decoding)
        self.draft_accepted = 0  # and those the model's own sampling confirmed
        self.started = self.first = self.last = time.perf_counter()

    def ends(self, token: int, taken: int = 1) -> bool:
        """Whether a token sampled, ``taken``-th of those not yet added, ends the answer whatever its
        text: end of generation, or the answer's length (a stop string shows only in the text)."""
        return self._at_end(token) or self.generated + taken >= self.limit

    def _at_end(self, token: int) -> bool:
        """The end of generation, unless the answer was asked to ignore it (ends() and add() agree)."""
        return self._is_end(token) and not self._ignore_eos

    def add(self, token: int, logprobs: TokenLogprob | None = None) -> tuple[Chunk | None, str | None]:
        """Take a sampled token: (a Chunk to pass on or None, the finish reason if the answer ends)."""
        self.last = time.perf_counter()
        if self.sampled == 0:
            self.first = self.last
        self.sampled += 1
        if self._at_end(token):
            return None, "stop"
        self.generated += 1
        data = self._undecoded + self._piece(token)
        text, used = codecs.utf_8_decode(data, "replace", False)
        self._undecoded = data[used:]
        text, stopped = self._scanner.feed(text)
        thought = ""
        if self._reasoning is not None:
            text, thought = self._reasoning.feed(text)
        chunk = Chunk(text, token, logprobs=logprobs, reasoning=thought) if text or thought or stopped or logprobs else None
        if stopped:
            self._hit_stop = True
            return chunk, "stop"
        return chunk, ("length" if self.generated >= self.limit else None)

    def finish(self, reason: str) -> Chunk:
        # text held back as a possible stop string is real text unless a stop string matched
        tail = "" if self._hit_stop else self._scanner.flush() + self._undecoded.decode("utf-8", "replace")
        thought, unclosed = "", False
        if self._reasoning is not None:
            tail, thought = self._reasoning.feed(tail)
            rest, more = self._reasoning.flush()
            tail, thought = tail + rest, thought + more
            # a model that ended its turn without closing its thinking wrote no answer apart from it:
            # what it wrote is the answer (a cut answer's thinking stays thinking: it was cut)
            unclosed = self._reasoning.unclosed and reason == "stop" and bool(self._reasoning.thought.strip())
            if unclosed:
                tail = self._reasoning.thought.strip()
        timings = Timings(
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            prompt_ms=(self.first - self.started) * 1000 if self.sampled else 0.0,
            generated_tokens=self.generated,
            decode_steps=max(self.sampled - 1, 0),
            generate_ms=(self.last - self.first) * 1000,
            draft_tokens=self.draft_tokens,
            draft_accepted=self.draft_accepted,
        )
        stop = self._scanner.matched if self._hit_stop else None
        return Chunk(tail, finish_reason=reason, timings=timings, reasoning=thought, stop=stop,
                     unclosed_thought=unclosed)
