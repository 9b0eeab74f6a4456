"""Read and validate a GGUF header before anything else touches the file.

``gguf``'s own reader can hang or exhaust memory on a tiny crafted file (an array count of 2^63),
and llama.cpp's loader has had many such bugs, so every GGUF edgellm sees goes through here first.
Every count and length is checked against the bytes the file could actually hold before it is
used, so a hostile file is refused quickly and in bounded memory, each with its own message. The
rules follow llama.cpp's ``gguf.cpp`` and ``tests/test-gguf.cpp``.
"""

from __future__ import annotations

import array
import math
import mmap
import os
import stat
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import InvalidGGUFError, TruncatedGGUFError, UsageError, brief
from edgellm.gguf.ggml_types import FILE_TYPES, GGML_TYPES

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_KEY_LEN = 1024
MAX_STRING_LEN = 64 << 20
MAX_ARRAY_LEN = 1 << 28
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
INT64_MAX = (1 << 63) - 1
#: arrays up to this many elements are kept in memory (per-layer values, small token lists);
#: longer ones (vocabularies, merges) are checked and counted, not kept
KEEP_ARRAY_LEN = 4096

# GGUF value types: id -> (name, struct format or None for string/array)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = (
    range(13)
)
_U64 = struct.Struct("<Q")
_SCALAR_FORMATS = {
    UINT8: "B",
    INT8: "b",
    UINT16: "H",
    INT16: "h",
    UINT32: "I",
    INT32: "i",
    FLOAT32: "f",
    BOOL: "?",
    UINT64: "Q",
    INT64: "q",
    FLOAT64: "d",
}


_INCOMPLETE = "the file is incomplete; download or convert it again"

@dataclass(frozen=True)
class ArrayValue:
    """A GGUF array: its element type and length, with the values when the array is short."""

    item_type: int
    count: int
    values: tuple[Any, ...] | None = None
    pos: int = field(default=-1, repr=False, compare=False)  # where its elements start in the file

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] is the row length
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    file_size: int
    version: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any]
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    def arch_value(self, key: str, default: Any = None) -> Any:
        """``{arch}.{key}``, the per-architecture hyperparameters llama.cpp reads."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def name(self) -> str | None:
        return self.metadata.get("general.name")

    @property
    def n_vocab(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        return len(tokens) if tokens is not None else self.arch_value("vocab_size")

    @property
    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    @property
    def context_length(self) -> int | None:
        return self.arch_value("context_length")

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def experts(self) -> tuple[int, int] | None:
        """A mixture of experts' (experts per layer, those a token is routed to); None for a dense
        model (or counts that make no sense)."""
        n_expert, n_used = self.arch_value("expert_count"), self.arch_value("expert_used_count")
        if not isinstance(n_expert, int) or not isinstance(n_used, int) or not 0 < n_used <= n_expert:
            return None
        return n_expert, n_used

    @property
    def active_parameter_count(self) -> int:
        """The parameters one token passes through: all of them, except that of each expert tensor
        (``*_exps``) only the share of experts a token is routed to (expert_used_count of
        expert_count) counts. What decoding speed follows; memory still holds every expert."""
        if self.experts is None:
            return self.parameter_count
        n_expert, n_used = self.experts
        return sum(t.n_elements * n_used // n_expert if "_exps." in t.name else t.n_elements for t in self.tensors)

    @property
    def type_histogram(self) -> dict[str, tuple[int, int]]:
        """Tensor type -> (tensor count, bytes), largest first."""
        counts: Counter[str] = Counter()
        sizes: Counter[str] = Counter()
        for t in self.tensors:
            counts[t.type_name] += 1
            sizes[t.type_name] += t.nbytes
        return {k: (counts[k], sizes[k]) for k, _ in sizes.most_common()}

    def summary(self) -> dict[str, Any]:
        """The facts people ask of a model file, as plain data (``edgellm show``), every string in it
        printable (a model's name may carry terminal escape sequences)."""
        rope_scaling = self.arch_value("rope.scaling.type")
        return _printable_values({
            "name": self.name,
            "path": str(self.path),
            "architecture": self.architecture,
            "parameters": self.parameter_count,
            "size_label": format_params(self.parameter_count),
            "quantization": self.quantization,
            "file_size": self.file_size,
            "gguf_version": self.version,
            "context_length": self.context_length,
            "layers": self.arch_value("block_count"),
            "embedding_length": self.arch_value("embedding_length"),
            "feed_forward_length": _plain(self.arch_value("feed_forward_length")),
            "heads": _plain(self.arch_value("attention.head_count")),
            "kv_heads": _plain(self.arch_value("attention.head_count_kv")),
            "key_length": self.arch_value("attention.key_length"),
            "value_length": self.arch_value("attention.value_length"),
            "sliding_window": self.arch_value("attention.sliding_window"),
            "vocab_size": self.n_vocab,
            "tokenizer": self.metadata.get("tokenizer.ggml.model"),
            "rope": {
                "freq_base": self.arch_value("rope.freq_base"),
                "dimension_count": self.arch_value("rope.dimension_count"),
                "scaling_type": rope_scaling,
                "scaling_factor": self.arch_value("rope.scaling.factor"),
            },
            "chat_template": self.chat_template,
            "tensor_count": len(self.tensors),
            "tensor_types": {
                name: {"tensors": count, "bytes": nbytes}
                for name, (count, nbytes) in self.type_histogram.items()
            },
        })

    @property
    def quantization(self) -> str:
        """The file type llama.cpp reports (``Q4_K_M``, ``F16`` ...), else the dominant tensor type."""
        ftype = self.metadata.get("general.file_type")
        if isinstance(ftype, int):
            return FILE_TYPES.get(ftype, f"type {ftype}")
        weights = [t for t in self.tensors if len(t.shape) >= 2]
        if not weights:
            return "unknown"
        return Counter(t.type_name for t in weights).most_common(1)[0][0]


def _printable_values(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _printable_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_values(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    """Per-layer arrays (Gemma, OpenELM) become lists; scalars stay as they are."""
    if isinstance(value, ArrayValue):
        return list(value.values) if value.values is not None else f"{value.count} values"
    return value


def format_params(n: int) -> str:
    """135M, 1.7B: the size label people use for models."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value >= 100 else f"{value:.3g}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class _Cursor:
    """Bounds-checked little-endian reads over the mapped file."""

    def __init__(self, buf: mmap.mmap | bytes, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def fail(self, detail: str, hint: str | None = None) -> InvalidGGUFError:
        return InvalidGGUFError(f"{self.path.name}: {detail}", hint)

    def truncated(self, detail: str) -> TruncatedGGUFError:
        return TruncatedGGUFError(f"{self.path.name}: truncated GGUF: {detail}", _INCOMPLETE)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.truncated(f"{what} at byte {self.pos} needs {n} bytes, only {self.size - self.pos} remain")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str, cap: int = MAX_STRING_LEN) -> str:
        length = self.scalar("Q", f"length of {what}")
        if length > cap:
            raise self.fail(f"{what} is {length} bytes long, over the limit of {cap}")
        self.need(length, what)
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        length = self.scalar("Q", f"length of {what}")
        if length > MAX_STRING_LEN:
            raise self.fail(f"{what} is {length} bytes long, over the limit of {MAX_STRING_LEN}")
        self.need(length, what)
        self.pos += length

    def _skip_strings(self, count: int, what: str) -> None:
        """Step over a long string array (a vocabulary): the hot loop of header reading."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for i in range(count):
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of element {i} of {what}")
            (length,) = unpack(buf, pos)
            pos += 8
            if length > MAX_STRING_LEN or pos + length > size:
                self.pos = pos - 8
                self.skip_string(f"element {i} of {what}")  # raises with the precise message
            pos += length
        self.pos = pos

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            if depth:
                raise self.fail(f"{what} is a nested array, which GGUF does not allow")
            return self.array(what)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str) -> ArrayValue:
        item_type = self.scalar("I", f"element type of {what}")
        count = self.scalar("Q", f"length of {what}")
        if item_type == ARRAY:
            raise self.fail(f"{what} is a nested array, which GGUF does not allow")
        if item_type != STRING and item_type not in _SCALAR_FORMATS:
            raise self.fail(f"{what} has unknown element type {item_type}")
        if count > MAX_ARRAY_LEN:
            raise self.fail(f"{what} claims {count} elements, over the limit of {MAX_ARRAY_LEN}")
        start = self.pos
        if item_type == STRING:
            # each string needs at least its 8-byte length
            self.need(count * 8, f"{count} strings of {what}")
            if count <= KEEP_ARRAY_LEN:
                items = tuple(self.string(f"element {i} of {what}") for i in range(count))
                return ArrayValue(item_type, count, items, start)
            self._skip_strings(count, what)
            return ArrayValue(item_type, count, pos=start)
        fmt = _SCALAR_FORMATS[item_type]
        width = struct.calcsize("<" + fmt)
        self.need(count * width, f"{count} elements of {what}")
        values = None
        if count <= KEEP_ARRAY_LEN:
            values = struct.unpack_from(f"<{count}{fmt}", self.buf, self.pos)
        self.pos += count * width
        return ArrayValue(item_type, count, values, start)


def read_header(path: str | Path, full_size: int | None = None, model: bool = True) -> GGUFHeader:
    """Parse and validate a GGUF file's header; raise InvalidGGUFError naming the first problem.

    ``full_size`` is for a file that holds only the start of a GGUF (a remote header fetched with a
    range request): the header must lie within the bytes present, the tensors within ``full_size``.
    ``model`` off reads a GGUF that holds data rather than a model (an importance matrix): no
    architecture or vocabulary to check.
    """
    path = Path(path)
    try:
        # never block: opening a FIFO for reading waits for a writer; a non-blocking open returns at
        # once, and _file_size then refuses anything but a regular file
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as fh:
            size = _file_size(fh, path)
            if size < 24:
                head = fh.read(4)
                if head != GGUF_MAGIC:
                    raise _not_gguf(path, head)
                raise TruncatedGGUFError(
                    f"{path.name}: truncated GGUF: {size} bytes is smaller than the 24-byte header", _INCOMPLETE)
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, size, path, full_size or size, model)
    except FileNotFoundError:
        raise InvalidGGUFError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InvalidGGUFError(f"{path} is a folder, not a GGUF file") from None
    except PermissionError:
        raise InvalidGGUFError(f"permission denied reading {path}") from None
    except OSError as exc:  # a name too long, a symlink loop, a device that refuses to be read
        raise InvalidGGUFError(f"cannot read {path}: {exc.strerror or exc}") from None


def _file_size(fh: Any, path: Path) -> int:
    st = os.fstat(fh.fileno())
    if stat.S_ISDIR(st.st_mode):
        raise InvalidGGUFError(f"{path} is a folder, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidGGUFError(f"{path} is not a regular file")
    return st.st_size


def _not_gguf(path: Path, head: bytes) -> InvalidGGUFError:
    return InvalidGGUFError(
        f"{path.name} is not a GGUF file (it starts with {head!r}, not b'GGUF')",
        hint="edgellm runs GGUF models; convert a Hugging Face checkpoint with `edgellm convert`",
    )


def _parse(buf: mmap.mmap, size: int, path: Path, full_size: int, model: bool = True) -> GGUFHeader:
    cur = _Cursor(buf, size, path)
    magic = bytes(buf[:4])
    if magic != GGUF_MAGIC:
        raise _not_gguf(path, magic)
    cur.pos = 4
    version = cur.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2 and 3)")
    n_tensors = cur.scalar("Q", "tensor count")
    n_kv = cur.scalar("Q", "metadata key count")
    # the smallest key/value pair: 8-byte key length, a 1-byte key, 4-byte type, a 1-byte value;
    # the smallest tensor info: 8 + 1 name bytes, 4-byte n_dims, one 8-byte dim, type, offset
    if n_kv > MAX_KV or n_kv * 14 > full_size - cur.pos:
        raise cur.fail(f"header claims {n_kv} metadata keys, more than the file could hold")
    if n_tensors > MAX_TENSORS or n_tensors * 33 > full_size - cur.pos:
        raise cur.fail(f"header claims {n_tensors} tensors, more than the file could hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key {i}", cap=MAX_KEY_LEN)
        if not key:
            raise cur.fail(f"metadata key {i} is empty")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.scalar("I", f"type of {key!r}")
        metadata[key] = cur.value(vtype, repr(key))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if (
        not isinstance(alignment, int)
        or isinstance(alignment, bool)
        or alignment <= 0
        or alignment & (alignment - 1)
    ):
        raise cur.fail(f"general.alignment {alignment!r} is not a positive power of two")

    infos: list[tuple[str, tuple[int, ...], int, str, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor {i}", cap=MAX_KEY_LEN)
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.scalar("I", f"n_dims of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.scalar("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        n_elements = 1
        for d in shape:
            if d <= 0 or d > INT64_MAX:
                raise cur.fail(f"tensor {name!r} has an invalid dimension {d} in shape {shape}")
            n_elements *= d
        if n_elements > INT64_MAX:
            raise cur.fail(f"tensor {name!r} has {n_elements} elements, which overflows int64")
        ggml_type = cur.scalar("I", f"type of tensor {name!r}")
        if ggml_type not in GGML_TYPES:
            raise cur.fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
        type_name, block, block_bytes = GGML_TYPES[ggml_type]
        if shape[0] % block:
            raise cur.fail(
                f"tensor {name!r} row length {shape[0]} is not a multiple of the "
                f"{type_name} block size {block}"
            )
        nbytes = n_elements // block * block_bytes
        offset = cur.scalar("Q", f"offset of tensor {name!r}")
        infos.append((name, shape, ggml_type, type_name, offset, nbytes))

    size = full_size  # from here on only the tensors' place in the whole file is checked
    data_offset = _align(cur.pos, alignment)
    if data_offset > size:
        raise cur.truncated(f"the tensor data should start at byte {data_offset}, but the file is {size} bytes")
    tensors: list[TensorInfo] = []
    expected = 0
    for name, shape, ggml_type, type_name, offset, nbytes in infos:
        if offset != expected:
            raise cur.fail(f"tensor {name!r} has offset {offset}, expected {expected}")
        if data_offset + offset + nbytes > size:
            raise cur.truncated(
                f"tensor {name!r} ends at byte {data_offset + offset + nbytes}, past the end of the file ({size} bytes)")
        tensors.append(TensorInfo(name, shape, ggml_type, type_name, data_offset + offset, nbytes))
        expected = _align(offset + nbytes, alignment)

    header = GGUFHeader(path, size, version, alignment, data_offset, metadata, tuple(tensors))
    if model:
        _check_model_metadata(header, cur)
        _check_hyperparameters(header, cur)
    return header


def check_lora(path: str | None, header: GGUFHeader) -> Path | None:
    """The adapter file, validated and checked against the model, before llama.cpp sees it."""
    if path is None:
        return None
    lora = read_header(Path(path).expanduser())
    meta = lora.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise UsageError(f"{lora.path.name} is not a LoRA adapter GGUF", hint="make one with `edgellm convert-lora`")
    if lora.architecture != header.architecture:
        raise UsageError(f"LoRA {lora.path.name} is for {lora.architecture}, the model is {header.architecture}")
    return lora.path


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_model_metadata(header: GGUFHeader, cur: _Cursor) -> None:
    """Keys llama.cpp trusts blindly: the architecture, and tokenizer arrays against the vocab."""
    md = header.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise cur.fail("general.architecture is missing or not a string")
    tokens = md.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, ArrayValue) or tokens.item_type != STRING:
        raise cur.fail("tokenizer.ggml.tokens is not an array of strings")
    n_vocab = tokens.count
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        arr = md.get(key)
        if arr is not None and (not isinstance(arr, ArrayValue) or arr.count != n_vocab):
            length = arr.count if isinstance(arr, ArrayValue) else "not an array"
            raise cur.fail(f"{key} has {length} entries but the vocabulary has {n_vocab} tokens")
    declared = md.get(f"{arch}.vocab_size")
    if isinstance(declared, int) and declared != n_vocab:
        raise cur.fail(f"{arch}.vocab_size is {declared} but the vocabulary has {n_vocab} tokens")
    for key, value in md.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise cur.fail(f"{key} is not an integer")
            if not 0 <= value < n_vocab and value != -1 and value != 0xFFFFFFFF:
                raise cur.fail(f"{key} is {value}, outside the vocabulary of {n_vocab} tokens")
    _check_vocabulary(cur, tokens, md.get("tokenizer.ggml.scores"), md.get("tokenizer.ggml.token_type"))


#: llama.cpp's LLAMA_MAX_LAYERS and LLAMA_MAX_EXPERTS
MAX_LAYERS, MAX_EXPERTS = 512, 1024
#: integer hyperparameters llama.cpp sizes tensors and loops by: (key suffix, smallest, largest)
_INT_HPARAMS = (
    ("block_count", 1, MAX_LAYERS),
    ("context_length", 1, 1 << 30),
    ("embedding_length", 1, 1 << 20),
    ("feed_forward_length", 0, 1 << 22),
    ("attention.head_count", 0, 1 << 14),
    ("attention.head_count_kv", 0, 1 << 14),
    ("attention.key_length", 1, 1 << 16),
    ("attention.value_length", 1, 1 << 16),
    ("attention.sliding_window", 0, 1 << 30),
    ("rope.dimension_count", 0, 1 << 16),
    ("vocab_size", 1, 1 << 24),
    ("expert_count", 0, MAX_EXPERTS),
    ("expert_used_count", 0, MAX_EXPERTS),
)
#: float hyperparameters: (key suffix, must be > 0 rather than >= 0)
_FLOAT_HPARAMS = (
    ("attention.layer_norm_rms_epsilon", False),
    ("attention.layer_norm_epsilon", False),
    ("rope.freq_base", True),
    ("rope.freq_base_swa", True),
    ("rope.scaling.factor", True),
    ("rope.freq_scale", True),
)
#: llama_token_type: undefined, normal, unknown, control, user-defined, unused, byte
_TOKEN_TYPES = range(7)


def _check_hyperparameters(header: GGUFHeader, cur: _Cursor) -> None:
    """The numbers llama.cpp builds the model from, refused when impossible: a zero layer count or a
    NaN epsilon makes it abort the process, a NaN rope base answers garbage, a million layers burn
    minutes before anything fails. Absent keys are llama.cpp's to default or refuse."""
    arch, md = header.architecture, header.metadata
    n_layer = md.get(f"{arch}.block_count")
    for suffix, low, high in _INT_HPARAMS:
        key = f"{arch}.{suffix}"
        value = md.get(key)
        if value is None:
            continue
        values = value.values if isinstance(value, ArrayValue) else (value,)
        if isinstance(value, ArrayValue):
            if value.item_type in (FLOAT32, FLOAT64, STRING, BOOL) or values is None:
                raise cur.fail(f"{key} is not a list of integers")
            if isinstance(n_layer, int) and value.count != n_layer:
                raise cur.fail(f"{key} has {value.count} entries for {n_layer} layers")
        for v in values:
            if not isinstance(v, int) or isinstance(v, bool):
                raise cur.fail(f"{key} is {brief(v)}, not an integer")
            if not low <= v <= high:
                raise cur.fail(f"{key} is {v}, outside {low}..{high}")
    heads, kv_heads = md.get(f"{arch}.attention.head_count"), md.get(f"{arch}.attention.head_count_kv")
    if isinstance(heads, int) and isinstance(kv_heads, int) and kv_heads > heads:
        raise cur.fail(f"{arch}.attention.head_count_kv is {kv_heads}, more than the {heads} attention heads")
    experts, used = md.get(f"{arch}.expert_count"), md.get(f"{arch}.expert_used_count")
    if isinstance(experts, int) and isinstance(used, int) and used > experts:
        raise cur.fail(f"{arch}.expert_used_count is {used}, more than the {experts} experts")
    for suffix, positive in _FLOAT_HPARAMS:
        key = f"{arch}.{suffix}"
        value = md.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise cur.fail(f"{key} is {brief(value)}, not a number")
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise cur.fail(f"{key} is {value}, which must be a finite number {'above' if positive else 'at least'} 0")


def _check_vocabulary(cur: _Cursor, tokens: ArrayValue, scores: Any, types: Any) -> None:
    """Token strings unique (llama.cpp aborts on a repeated one), token types known, scores finite."""
    seen: set[bytes] = set()
    buf, pos, unpack = cur.buf, tokens.pos, _U64.unpack_from
    for i in range(tokens.count):
        (length,) = unpack(buf, pos)
        text = buf[pos + 8 : pos + 8 + length]
        if text in seen:
            raise cur.fail(f"token {i} ({brief(text.decode('utf-8', 'replace'))}) appears twice in the vocabulary")
        seen.add(text)
        pos += 8 + length
    if isinstance(scores, ArrayValue) and scores.item_type in (FLOAT32, FLOAT64):
        values = array.array("f" if scores.item_type == FLOAT32 else "d")
        values.frombytes(buf[scores.pos : scores.pos + scores.count * values.itemsize])
        if not all(map(math.isfinite, values)):
            raise cur.fail("tokenizer.ggml.scores holds a value that is not a finite number")
    if isinstance(types, ArrayValue):
        if types.item_type not in (INT32, UINT32):
            raise cur.fail("tokenizer.ggml.token_type is not a list of 32-bit integers")
        values = array.array("i" if types.item_type == INT32 else "I")
        values.frombytes(buf[types.pos : types.pos + types.count * 4])
        if values and not (min(values) >= 0 and max(values) < len(_TOKEN_TYPES)):
            raise cur.fail(f"tokenizer.ggml.token_type holds an unknown token type (known: 0..{len(_TOKEN_TYPES) - 1})")


_CONTROL = {c: None for c in [*range(0x20), *range(0x7F, 0xA0)] if c not in (0x09, 0x0A)}
_CONTROL.update({c: None for c in (0x200E, 0x200F, 0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069)})


def printable(text: str) -> str:
    """A model-provided string made safe to show in a terminal: control characters (escape sequences
    among them) and bidirectional overrides removed; tabs and newlines kept."""
    return text.translate(_CONTROL)

