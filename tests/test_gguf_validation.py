"""Every header rule of the validator, on hand-made hostile files and on the real SmolLM2."""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import pytest

from edgellm.errors import InvalidGGUFError
from edgellm.gguf.header import read_header
from tests.ggufcraft import (
    ARR,
    U32,
    Craft,
    kv_f32,
    kv_f32_array,
    kv_i32_array,
    kv_str,
    kv_str_array,
    kv_u32,
    s,
    tensor_info,
)

HUGE = 1 << 63


def _craft(**changes) -> Craft:
    craft = Craft()
    for key, value in changes.items():
        setattr(craft, key, value)
    return craft


def _replace_kv(index: int, raw: bytes) -> list[bytes]:
    kvs = Craft().kvs
    kvs[index] = raw
    return kvs


HOSTILE = {
    "bad magic": (_craft(magic=b"GGML"), "is not a GGUF file"),
    "version 1": (_craft(version=1), "unsupported GGUF version 1"),
    "version 4": (_craft(version=4), "unsupported GGUF version 4"),
    "tensor count 2^63": (_craft(n_tensors=HUGE), "tensors, more than the file could hold"),
    "key count 2^63": (_craft(n_kv=HUGE), "metadata keys, more than the file could hold"),
    "key length 2^63": (
        _craft(kvs=_replace_kv(0, struct.pack("<Q", HUGE) + b"general.architecture")),
        "over the limit",
    ),
    "string value past the end": (
        _craft(kvs=_replace_kv(0, s("general.architecture") + struct.pack("<IQ", 8, 100_000) + b"llama")),
        "truncated GGUF",
    ),
    "array count 2^63": (
        _craft(kvs=_replace_kv(3, s("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, 6, HUGE))),
        "elements, over the limit",
    ),
    "array longer than the file": (
        _craft(kvs=_replace_kv(3, s("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, 6, 1 << 27))),
        "truncated GGUF",
    ),
    "string array longer than the file": (
        _craft(kvs=_replace_kv(2, s("tokenizer.ggml.tokens") + struct.pack("<IIQ", ARR, 8, 1 << 27))),
        "truncated GGUF",
    ),
    "unknown value type": (
        _craft(kvs=_replace_kv(1, s("llama.context_length") + struct.pack("<II", 13, 128))),
        "unknown value type 13",
    ),
    "unknown array element type": (
        _craft(kvs=_replace_kv(3, s("tokenizer.ggml.scores") + struct.pack("<IIQ", ARR, 77, 1))),
        "unknown element type 77",
    ),
    "nested array": (
        _craft(kvs=_replace_kv(3, s("x.nested") + struct.pack("<IIQ", ARR, ARR, 1) + struct.pack("<IQ", U32, 0))),
        "nested array",
    ),
    "duplicate key": (_craft(kvs=[*Craft().kvs, kv_u32("llama.context_length", 64)]), "duplicate metadata key"),
    "empty key": (_craft(kvs=[*Craft().kvs, kv_u32("", 1)]), "is empty"),
    "key not utf-8": (_craft(kvs=[*Craft().kvs, s(b"\xff\xfe") + struct.pack("<II", U32, 1)]), "not valid UTF-8"),
    "duplicate tensor name": (
        _craft(tensors=[tensor_info("a", (8, 2), 0, 0), tensor_info("a", (4,), 0, 64)]),
        "duplicate tensor name 'a'",
    ),
    "5 dimensions": (
        _craft(tensors=[tensor_info("a", (1, 1, 1, 1, 16), 0, 0), tensor_info("b", (4,), 0, 64)]),
        "has 5 dimensions",
    ),
    "0 dimensions": (
        _craft(tensors=[s("a") + struct.pack("<IIQ", 0, 0, 0), tensor_info("b", (4,), 0, 64)]),
        "has 0 dimensions",
    ),
    "zero-sized dimension": (
        _craft(tensors=[tensor_info("a", (8, 0), 0, 0), tensor_info("b", (4,), 0, 64)]),
        "invalid dimension 0",
    ),
    "element count overflow": (
        _craft(tensors=[tensor_info("a", (1 << 62, 1 << 62), 0, 0), tensor_info("b", (4,), 0, 64)]),
        "overflows int64",
    ),
    "unknown tensor type": (
        _craft(tensors=[tensor_info("a", (8, 2), 4, 0), tensor_info("b", (4,), 0, 64)]),
        "unknown ggml type 4",
    ),
    "row not a whole block": (
        _craft(tensors=[tensor_info("a", (33, 2), 2, 0), tensor_info("b", (4,), 0, 64)]),
        "not a multiple of the Q4_0 block size 32",
    ),
    "misplaced offset": (
        _craft(tensors=[tensor_info("a", (8, 2), 0, 0), tensor_info("b", (4,), 0, 96)]),
        "offset 96, expected 64",
    ),
    "tensor past the end": (_craft(data_size=64 + 8), "past the end of the file"),
    "alignment not a power of two": (
        _craft(kvs=[*Craft().kvs, kv_u32("general.alignment", 24)]),
        "general.alignment 24 is not a positive power of two",
    ),
    "alignment zero": (
        _craft(kvs=[*Craft().kvs, kv_u32("general.alignment", 0)]),
        "general.alignment 0 is not a positive power of two",
    ),
    "alignment not an integer": (
        _craft(kvs=[*Craft().kvs, kv_str("general.alignment", "32")]),
        "is not a positive power of two",
    ),
    "no architecture": (_craft(kvs=Craft().kvs[1:]), "general.architecture is missing"),
    "scores shorter than the vocabulary": (
        _craft(kvs=_replace_kv(3, kv_f32_array("tokenizer.ggml.scores", [0.0, 0.0]))),
        "tokenizer.ggml.scores has 2 entries but the vocabulary has 3",
    ),
    "vocab_size disagrees": (
        _craft(kvs=[*Craft().kvs, kv_u32("llama.vocab_size", 5)]),
        "llama.vocab_size is 5 but the vocabulary has 3",
    ),
    "token id outside the vocabulary": (
        _craft(kvs=_replace_kv(4, kv_u32("tokenizer.ggml.bos_token_id", 10))),
        "bos_token_id is 10, outside the vocabulary of 3 tokens",
    ),
    # hyperparameters llama.cpp trusts: these abort it (exit 134), burn minutes, or answer garbage
    "no layers": (_craft(kvs=[*Craft().kvs, kv_u32("llama.block_count", 0)]), "llama.block_count is 0, outside 1..512"),
    "a million layers": (
        _craft(kvs=[*Craft().kvs, kv_u32("llama.block_count", 10**6)]), "llama.block_count is 1000000, outside 1..512"
    ),
    "layer count as text": (
        _craft(kvs=[*Craft().kvs, kv_str("llama.block_count", "24")]), "llama.block_count is '24', not an integer"
    ),
    "NaN norm epsilon": (
        _craft(kvs=[*Craft().kvs, kv_f32("llama.attention.layer_norm_rms_epsilon", float("nan"))]),
        "layer_norm_rms_epsilon is nan, which must be a finite number at least 0",
    ),
    "negative norm epsilon": (
        _craft(kvs=[*Craft().kvs, kv_f32("llama.attention.layer_norm_rms_epsilon", -1e-5)]),
        "layer_norm_rms_epsilon is -9.99",
    ),
    "NaN rope base": (
        _craft(kvs=[*Craft().kvs, kv_f32("llama.rope.freq_base", float("nan"))]),
        "llama.rope.freq_base is nan, which must be a finite number above 0",
    ),
    "infinite rope base": (
        _craft(kvs=[*Craft().kvs, kv_f32("llama.rope.freq_base", float("inf"))]), "llama.rope.freq_base is inf"
    ),
    "negative rope base": (
        _craft(kvs=[*Craft().kvs, kv_f32("llama.rope.freq_base", -10000.0)]), "llama.rope.freq_base is -10000.0"
    ),
    "zero rope base": (_craft(kvs=[*Craft().kvs, kv_f32("llama.rope.freq_base", 0.0)]), "llama.rope.freq_base is 0.0"),
    "more KV heads than heads": (
        _craft(kvs=[*Craft().kvs, kv_u32("llama.attention.head_count", 4), kv_u32("llama.attention.head_count_kv", 8)]),
        "head_count_kv is 8, more than the 4 attention heads",
    ),
    "per-layer heads of the wrong length": (
        _craft(kvs=[*Craft().kvs, kv_u32("llama.block_count", 2), kv_i32_array("llama.attention.head_count", [4] * 3)]),
        "llama.attention.head_count has 3 entries for 2 layers",
    ),
    "a token twice": (
        _craft(kvs=_replace_kv(2, kv_str_array("tokenizer.ggml.tokens", ["a", "b", "a"]))),
        "token 2 ('a') appears twice in the vocabulary",
    ),
    "unknown token type": (
        _craft(kvs=[*Craft().kvs, kv_i32_array("tokenizer.ggml.token_type", [1, 9, 1])]),
        "tokenizer.ggml.token_type holds an unknown token type",
    ),
    "NaN token score": (
        _craft(kvs=_replace_kv(3, kv_f32_array("tokenizer.ggml.scores", [0.0, float("nan"), 0.0]))),
        "tokenizer.ggml.scores holds a value that is not a finite number",
    ),
    "tokens not strings": (
        _craft(kvs=_replace_kv(2, kv_f32_array("tokenizer.ggml.tokens", [1.0, 2.0, 3.0]))),
        "tokenizer.ggml.tokens is not an array of strings",
    ),
}


def test_the_crafted_file_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(Craft().build())
    header = read_header(path)
    assert header.architecture == "llama"
    assert header.n_vocab == 3
    assert [t.name for t in header.tensors] == ["a", "b"]
    assert header.tensors[1].offset == header.data_offset + 64
    assert header.parameter_count == 20


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_quickly_in_flat_memory(case: str, tmp_path: Path) -> None:
    craft, expected = HOSTILE[case]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(craft.build())
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(InvalidGGUFError) as err:
        read_header(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert expected in err.value.message
    assert err.value.message.startswith("hostile.gguf")
    assert elapsed < 0.5
    assert peak < 2 << 20, f"{peak} bytes allocated"


def test_every_message_is_its_own() -> None:
    assert len(set(expected for _, expected in HOSTILE.values())) >= len(HOSTILE) - 6


def test_truncation_at_every_byte_is_refused(tmp_path: Path) -> None:
    data = Craft().build()
    path = tmp_path / "cut.gguf"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(InvalidGGUFError) as err:
            read_header(path)
        message = err.value.message
        if cut < 4:
            assert "not a GGUF file" in message
        else:
            assert "truncated GGUF" in message or "more than the file could hold" in message, (cut, message)


def test_truncations_of_the_real_model_are_refused(smollm2: Path, tmp_path: Path) -> None:
    header = read_header(smollm2)
    first, second = header.tensors[0], header.tensors[1]
    cuts = {
        "inside the counts": 20,
        "inside the metadata": 2000,
        "inside the tensor infos": header.data_offset - 100,
        "at the start of the data": header.data_offset,
        "inside the first tensor": first.offset + first.nbytes // 2,
        "between tensors": second.offset,
    }
    with open(smollm2, "rb") as fh:
        for where, cut in cuts.items():
            fh.seek(0)
            path = tmp_path / f"cut-{cut}.gguf"
            path.write_bytes(fh.read(cut))
            with pytest.raises(InvalidGGUFError, match="truncated GGUF|could hold"):
                read_header(path)
            path.unlink()


def test_real_model_header_matches_gguf_py(smollm2: Path) -> None:
    """Our reader against gguf-py's, on the real file: same keys, tensors and offsets."""
    import gguf

    ours = read_header(smollm2)
    theirs = gguf.GGUFReader(smollm2)
    assert ours.architecture == "llama"
    assert ours.arch_value("block_count") == int(theirs.fields["llama.block_count"].parts[-1][0])
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    assert [t.offset for t in ours.tensors] == [int(t.data_offset) for t in theirs.tensors]
    assert [t.nbytes for t in ours.tensors] == [int(t.n_bytes) for t in theirs.tensors]
    assert set(ours.metadata) == {k for k in theirs.fields if not k.startswith("GGUF.")}
    assert ours.n_vocab == 49152
