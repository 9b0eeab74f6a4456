"""Hand-made GGUF files, valid or broken on purpose, written byte by byte.

gguf-py's writer refuses to write most of these, which is the point: the validator must stand
against files no honest writer produces (llama.cpp's tests/test-gguf.cpp does the same).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

U32, I32, F32, STR, ARR, U64 = 4, 5, 6, 8, 9, 10


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv_str(key: str, value: str) -> bytes:
    return s(key) + struct.pack("<I", STR) + s(value)


def kv_u32(key: str, value: int) -> bytes:
    return s(key) + struct.pack("<I", U32) + struct.pack("<I", value)


def kv_f32(key: str, value: float) -> bytes:
    return s(key) + struct.pack("<I", F32) + struct.pack("<f", value)


def kv_i32_array(key: str, values: list[int]) -> bytes:
    return s(key) + struct.pack("<IIQ", ARR, I32, len(values)) + struct.pack(f"<{len(values)}i", *values)


def kv_str_array(key: str, values: list[str]) -> bytes:
    return s(key) + struct.pack("<IIQ", ARR, STR, len(values)) + b"".join(s(v) for v in values)


def kv_f32_array(key: str, values: list[float]) -> bytes:
    return s(key) + struct.pack("<IIQ", ARR, F32, len(values)) + struct.pack(f"<{len(values)}f", *values)


def tensor_info(name: str, shape: tuple[int, ...], ggml_type: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack(
        "<IQ", ggml_type, offset
    )


@dataclass
class Craft:
    """A small valid llama-style GGUF: a 3-token vocabulary and two F32 tensors."""

    version: int = 3
    magic: bytes = b"GGUF"
    kvs: list[bytes] = field(
        default_factory=lambda: [
            kv_str("general.architecture", "llama"),
            kv_u32("llama.context_length", 128),
            kv_str_array("tokenizer.ggml.tokens", ["a", "b", "c"]),
            kv_f32_array("tokenizer.ggml.scores", [0.0, 0.0, 0.0]),
            kv_u32("tokenizer.ggml.bos_token_id", 1),
        ]
    )
    tensors: list[bytes] = field(
        default_factory=lambda: [tensor_info("a", (8, 2), 0, 0), tensor_info("b", (4,), 0, 64)]
    )
    data_size: int = 64 + 16
    n_kv: int | None = None
    n_tensors: int | None = None

    def sections(self) -> list[bytes]:
        """The file's bytes, split where its sections begin (for truncation tests)."""
        header = self.magic + struct.pack(
            "<IQQ",
            self.version,
            len(self.tensors) if self.n_tensors is None else self.n_tensors,
            len(self.kvs) if self.n_kv is None else self.n_kv,
        )
        parts = [header[:4], header[4:8], header[8:24], *self.kvs, *self.tensors]
        used = sum(len(p) for p in parts)
        parts.append(b"\0" * ((-used) % 32))
        parts.append(bytes(range(256)) * (self.data_size // 256) + bytes(self.data_size % 256))
        return parts

    def build(self) -> bytes:
        return b"".join(self.sections())
