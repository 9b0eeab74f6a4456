"""Turning sampled tokens into text: byte pieces, whole UTF-8 characters, stop strings."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence


class PieceTable:
    """The bytes each token stands for, looked up once per token (special tokens render as nothing).

    llama-cpp-python's own detokenizer truncates pieces longer than 32 bytes; this one does not.
    """

    def __init__(self, vocab) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        lib, buf = self._lib, self._buf
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        data = buf.raw[:n]
        self._pieces[token] = data
        return data

    def text(self, token: int) -> str:
        """The token's own text in the vocabulary (``<|im_start|>`` for special tokens)."""
        if token < 0:
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")


class StopScanner:
    """Finds stop strings in streamed text, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        buf = self.held + text
        if not self.stops:
            return buf, False
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[: min(hits)], True
        keep = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens two sequences share from the start: what a KV cache can reuse."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
