"""Checkpoints published already quantized, read as the weights they stand for.

Unsloth's ``*-bnb-4bit`` bases, GPTQ and AWQ exports, FP8 and llm-compressor's compressed-tensors
store each linear layer's weight as packed integers beside scales (and zero points, group
indices, lookup tables). ``config.json``'s ``quantization_config`` names the method; a registry
maps it to a :class:`Scheme` that finds each layer's parts by their names, checks their shapes
against each other and the format before anything is written, and dequantizes one weight at a
time with numpy when the converter asks for it. The rest of the converter (architectures, LoRA
merge, writer) then sees an ordinary checkpoint of 16-bit weights. No quantization library is
imported, and nothing runs on a GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgellm.errors import CheckpointError


class Stored(Protocol):
    """A checkpoint tensor as the safetensors header lists it (TensorRef, or a remote header's)."""

    name: str
    dtype: str | None
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Dequantized:
    """One weight a quantized checkpoint stores in parts, read as float32 on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # what it stands for: F16 or BF16
    parts: Mapping[str, Any]  # role -> TensorRef
    decode: Callable[[dict[str, np.ndarray]], np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(part.nbytes for part in self.parts.values())

    def numpy(self) -> np.ndarray:
        arrays = {role: ref.numpy() for role, ref in self.parts.items()}
        with np.errstate(over="ignore", invalid="ignore"):
            data = self.decode(arrays)
        return np.ascontiguousarray(data, dtype=np.float32).reshape(self.shape)


@dataclass(frozen=True)
class Layer:
    """The parts found for one quantized weight: ``prefix`` is the module path."""

    prefix: str
    parts: dict[str, Stored]


@dataclass
class Scheme:
    """One quantization method: which tensor marks a quantized layer (``anchor``), the other
    parts beside it (``required`` and ``optional`` suffixes), the tensors it leaves unused
    (``dropped``: activation scales), how to check a layer's parts and find the weight's shape
    (``shape``), and how to turn their values into the weight (``decode``)."""

    label: str
    bits: float  # bits per weight the source keeps, for quantize's "gains nothing"
    anchor: str
    required: dict[str, str]
    shape: Callable[[Layer], tuple[int, ...]]
    decode: Callable[[Layer, tuple[int, ...]], Callable[[dict[str, np.ndarray]], np.ndarray]]
    optional: dict[str, str] = field(default_factory=dict)
    dropped: tuple[str, ...] = ()

    def layers(self, tensors: Mapping[str, Stored]) -> list[Layer]:
        out = []
        for name in tensors:
            if not name.endswith(self.anchor):
                continue
            prefix = name[: -len(self.anchor)]
            parts: dict[str, Stored] = {"anchor": tensors[name]}
            for role, suffix in {**self.required, **self.optional}.items():
                ref = tensors.get(prefix + suffix)
                if ref is None and role in self.required:
                    raise CheckpointError(
                        f"{name} has no {prefix + suffix} beside it", hint="is the download complete?"
                    )
                if ref is not None:
                    parts[role] = ref
            out.append(Layer(prefix, parts))
        return out


# -- reading packed integers --------------------------------------------------------------------
def unpack_rows(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Rows of int32 words holding ``bits``-bit values as one little-endian bit stream each (the
    layout of GPTQ, including 3-bit, and compressed-tensors): [rows, words] -> [rows, count]."""
    words = np.ascontiguousarray(words).view(np.uint32)
    rows, n_words = words.shape
    if n_words % bits:
        words = np.pad(words, ((0, 0), (0, bits - n_words % bits)))
    groups = words.reshape(rows, -1, bits)  # each group of `bits` words holds 32 values
    out = np.empty((rows, groups.shape[1], 32), np.uint8)  # bits <= 8 in every format read
    for i in range(32):
        start = i * bits
        word, offset = divmod(start, 32)
        low = min(32 - offset, bits)
        value = (groups[:, :, word] >> np.uint32(offset)) & np.uint32((1 << low) - 1)
        if low < bits:
            value |= (groups[:, :, word + 1] & np.uint32((1 << (bits - low)) - 1)) << np.uint32(low)
        out[:, :, i] = value
    return out.reshape(rows, -1)[:, :count]


def unpack_nibbles(words: np.ndarray, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Rows of int32 words of eight 4-bit values each, the lowest nibble first; ``order`` gives
    the column each nibble holds within its word (AWQ's GEMM layout interleaves them)."""
    words = np.ascontiguousarray(words).view(np.uint32)
    nibbles = np.stack([(words >> np.uint32(4 * i)) & np.uint32(15) for i in range(8)], axis=-1).astype(
        np.uint8
    )
    if order is not None:
        nibbles = nibbles[..., np.argsort(order)]
    return nibbles.reshape(words.shape[0], -1)


# -- checks ------------------------------------------------------------------------------------
def _expect(layer: Layer, role: str, shape: tuple[int, ...], dtypes: tuple[str, ...] | None = None) -> None:
    ref = layer.parts[role]
    if tuple(ref.shape) != tuple(shape):
        raise CheckpointError(
            f"{ref.name} has shape {list(ref.shape)}, but the layer's format needs {list(shape)}",
            hint="no file was written; the checkpoint is damaged",
        )
    if dtypes is not None and not _is(ref, dtypes):
        raise CheckpointError(
            f"{ref.name} is stored as {ref.dtype}, but the format stores it as {'/'.join(dtypes)}"
        )


def _finite(name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise CheckpointError(
            f"{name} holds scales that are not finite numbers (NaN or infinite)",
            hint="no file was written; the checkpoint is damaged",
        )
    return values


def _int(value: Any, what: str, choices: tuple[int, ...] | None = None, low: int = 1) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (choices and value not in choices)
    ):
        allowed = f" (one of {', '.join(map(str, choices))})" if choices else ""
        raise CheckpointError(f"config.json: quantization_config {what} is {value!r}{allowed}")
    return value


def _groups(size: int, group: int) -> int:
    return 1 if group == -1 else math.ceil(size / group)


def _group_of(size: int, group: int) -> np.ndarray:
    """Each of ``size`` inputs' group, for groups of ``group`` in order (-1: one group)."""
    return np.arange(size) // (size if group == -1 else group)


def _group_size(value: Any) -> int:
    """quantization_config's group_size: a positive size, or -1 for one group per row."""
    return -1 if value == -1 else _int(value, "group_size")


def _bits(bits: int, group: int) -> float:
    """Bits per weight of ``bits``-bit integers with a 16-bit scale and a zero point per group."""
    return bits + (16 + bits) / (group if group > 0 else 4096)


def _is(ref: Stored, dtypes: tuple[str, ...]) -> bool:
    """Whether a tensor is stored as one of ``dtypes`` (always, for a header that did not say)."""
    return ref.dtype is None or ref.dtype in dtypes


FLOATS = ("F32", "F16", "BF16")
INTS = ("I32",)


# -- bitsandbytes 4-bit (NF4/FP4) --------------------------------------------------------------
def _bnb4_state(layer: Layer) -> dict[str, Any]:
    ref = layer.parts["anchor"]
    raw = getattr(ref, "numpy", None)
    if raw is None:  # a remote header: the state's bytes are not in hand
        return {}
    try:
        state = json.loads(bytes(np.asarray(raw(), np.uint8)).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"{ref.name} is not a bitsandbytes quant state (a JSON object)")
    return state


def _bnb4_shape(layer: Layer) -> tuple[int, ...]:
    state = _bnb4_state(layer)
    packed = math.prod(layer.parts["weight"].shape)
    if not state:  # planned from a remote header: the size is what counts
        return (2 * packed, 1)
    shape = state.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise CheckpointError(f"{layer.parts['anchor'].name}: its shape is {shape!r}, not a weight's")
    n = math.prod(shape)
    blocksize = _int(
        state.get("blocksize"), "blocksize of " + layer.prefix, (32, 64, 128, 256, 512, 1024, 2048, 4096)
    )
    _expect(layer, "weight", ((n + 1) // 2, 1), ("U8",))
    _expect(layer, "quant_map", (16,), FLOATS)
    nested = "nested_absmax" in layer.parts
    _expect(layer, "absmax", (math.ceil(n / blocksize),), ("U8",) if nested else FLOATS)
    if nested:
        nested_size = _int(state.get("nested_blocksize"), "nested_blocksize of " + layer.prefix)
        if "nested_quant_map" not in layer.parts or not isinstance(state.get("nested_offset"), (int, float)):
            raise CheckpointError(f"{layer.prefix}: a double-quantized weight lacks its nested map or offset")
        _expect(layer, "nested_absmax", (math.ceil(math.ceil(n / blocksize) / nested_size),), FLOATS)
        _expect(layer, "nested_quant_map", (256,), FLOATS)
    return tuple(shape)


def _bnb4_decode(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    state = _bnb4_state(layer)
    n, blocksize = math.prod(shape), state["blocksize"]

    def decode(p: dict[str, np.ndarray]) -> np.ndarray:
        absmax = p["absmax"]
        if "nested_absmax" in p:
            nested = np.repeat(
                _finite(layer.prefix + " nested_absmax", p["nested_absmax"]), state["nested_blocksize"]
            )
            codes = _finite(layer.prefix + " nested_quant_map", p["nested_quant_map"])
            absmax = codes[absmax] * nested[: absmax.size] + np.float32(state["nested_offset"])
        absmax = _finite(layer.prefix + " absmax", absmax.astype(np.float32, copy=False))
        packed = p["weight"].reshape(-1)
        codes = np.empty(packed.size * 2, np.uint8)
        codes[0::2], codes[1::2] = packed >> 4, packed & 15
        values = _finite(layer.prefix + " quant_map", p["quant_map"])[codes[:n]]
        out = np.empty(n, np.float32)
        full = n - n % blocksize
        out[:full] = (values[:full].reshape(-1, blocksize) * absmax[: full // blocksize, None]).reshape(-1)
        if full < n:
            out[full:] = values[full:] * absmax[-1]
        return out

    return decode


def _bnb4(quant_type: str) -> Scheme:
    return Scheme(
        f"bitsandbytes {quant_type}",
        4.5,
        f".weight.quant_state.bitsandbytes__{quant_type}",
        {"weight": ".weight", "absmax": ".weight.absmax", "quant_map": ".weight.quant_map"},
        _bnb4_shape,
        _bnb4_decode,
        optional={"nested_absmax": ".weight.nested_absmax", "nested_quant_map": ".weight.nested_quant_map"},
    )


# -- bitsandbytes 8-bit (LLM.int8) -------------------------------------------------------------
def _int8_shape(layer: Layer) -> tuple[int, ...]:
    weight = layer.parts["weight"]
    if len(weight.shape) != 2 or not _is(weight, ("I8",)):
        raise CheckpointError(
            f"{weight.name} is {weight.dtype} of shape {list(weight.shape)}, not an int8 matrix"
        )
    _expect(layer, "anchor", (weight.shape[0],), FLOATS)
    return tuple(weight.shape)


def _int8_decode(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    def decode(p: dict[str, np.ndarray]) -> np.ndarray:
        scb = _finite(layer.prefix + ".SCB", p["anchor"].astype(np.float32))
        return p["weight"].astype(np.float32) * scb[:, None] * np.float32(1 / 127)

    return decode


BNB_INT8 = Scheme(
    "bitsandbytes int8",
    8.5,
    ".SCB",
    {"weight": ".weight"},
    _int8_shape,
    _int8_decode,
    dropped=(".weight_format",),
)


# -- GPTQ -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Groups:
    """Integer weights in groups along the input dimension, each group with a scale and a zero
    point per output row: what GPTQ and compressed-tensors' packed format share."""

    bits: int
    group_size: int  # -1: one group for the whole row


def _gptq_shape(q: _Groups) -> Callable[[Layer], tuple[int, ...]]:
    def shape(layer: Layer) -> tuple[int, ...]:
        qweight = layer.parts["anchor"]
        if len(qweight.shape) != 2 or not _is(qweight, INTS):
            raise CheckpointError(
                f"{qweight.name} is {qweight.dtype} of shape {list(qweight.shape)}, "
                "not GPTQ's packed int32 matrix"
            )
        rows, n_out = qweight.shape
        n_in = rows * 32 // q.bits
        if "g_idx" in layer.parts:
            n_in = layer.parts["g_idx"].shape[0] if len(layer.parts["g_idx"].shape) == 1 else -1
            if math.ceil(n_in * q.bits / 32) != rows:
                raise CheckpointError(
                    f"{qweight.name} packs {rows} rows of {q.bits}-bit values, which cannot hold "
                    f"the {n_in} inputs its g_idx lists"
                )
            _expect(layer, "g_idx", (n_in,), INTS)
        groups = _groups(n_in, q.group_size)
        _expect(layer, "scales", (groups, n_out), FLOATS)
        _expect(layer, "qzeros", (groups, math.ceil(n_out * q.bits / 32)), INTS)
        return (n_out, n_in)

    return shape


def _gptq_decode(q: _Groups, offset: int) -> Callable[[Layer, tuple[int, ...]], Callable]:
    def build(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        n_out, n_in = shape
        groups = _groups(n_in, q.group_size)

        def decode(p: dict[str, np.ndarray]) -> np.ndarray:
            if "g_idx" in p:
                g_idx = p["g_idx"].astype(np.int64)
                if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
                    raise CheckpointError(
                        f"{layer.prefix}.g_idx names groups outside 0..{groups - 1}",
                        hint="no file was written; the checkpoint is damaged",
                    )
            else:
                g_idx = _group_of(n_in, q.group_size)
            weight = unpack_rows(p["anchor"].T, q.bits, n_in).T  # [in, out]
            zeros = unpack_rows(p["qzeros"], q.bits, n_out).astype(np.int32) + offset
            scales = _finite(layer.prefix + ".scales", p["scales"])
            return (scales[g_idx] * (weight.astype(np.float32) - zeros[g_idx].astype(np.float32))).T

        return decode

    return build


def _gptq(config: dict[str, Any]) -> Scheme:
    bits = _int(config.get("bits"), "bits", (2, 3, 4, 8))
    group = _group_size(config.get("group_size", 128))
    fmt = config.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(
            f"config.json: GPTQ checkpoint_format {fmt!r} is not one edgellm reads (gptq, gptq_v2)"
        )
    q = _Groups(bits, group)
    # v1 stores each zero point less one (GPTQ's historical off-by-one); v2 stores it as it is
    return Scheme(
        f"GPTQ {bits}-bit",
        _bits(bits, group),
        ".qweight",
        {"qzeros": ".qzeros", "scales": ".scales"},
        _gptq_shape(q),
        _gptq_decode(q, 1 if fmt == "gptq" else 0),
        optional={"g_idx": ".g_idx"},
    )


# -- AWQ --------------------------------------------------------------------------------------
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column each nibble of a GEMM word holds


def _awq(config: dict[str, Any]) -> Scheme:
    bits = _int(config.get("bits", config.get("w_bit")), "bits", (4,))
    group = _group_size(config.get("group_size", config.get("q_group_size", 128)))
    version = str(config.get("version", "gemm")).lower()
    if version not in ("gemm", "gemv"):
        raise CheckpointError(f"config.json: AWQ version {version!r} is not one edgellm reads (gemm, gemv)")
    gemm = version == "gemm"

    def shape(layer: Layer) -> tuple[int, ...]:
        qweight = layer.parts["anchor"]
        if len(qweight.shape) != 2 or not _is(qweight, INTS):
            raise CheckpointError(
                f"{qweight.name} is {qweight.dtype} of shape {list(qweight.shape)}, "
                "not AWQ's packed int32 matrix"
            )
        if gemm:
            n_in, n_out = qweight.shape[0], qweight.shape[1] * 8
            groups = _groups(n_in, group)
            _expect(layer, "scales", (groups, n_out), FLOATS)
            _expect(layer, "qzeros", (groups, n_out // 8), INTS)
        else:
            n_out, n_in = qweight.shape[0], qweight.shape[1] * 8
            width = layer.parts["qzeros"].shape[1] if len(layer.parts["qzeros"].shape) == 2 else -1
            if width * 8 < _groups(n_in, group):
                raise CheckpointError(
                    f"{layer.prefix}.qzeros holds {max(width, 0) * 8} zero points per row, "
                    f"fewer than the {_groups(n_in, group)} groups"
                )
            _expect(layer, "qzeros", (n_out, width), INTS)
            _expect(layer, "scales", (n_out, width * 8), FLOATS)
        return (n_out, n_in)

    def build(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        n_out, n_in = shape
        groups = _group_of(n_in, group)

        def decode(p: dict[str, np.ndarray]) -> np.ndarray:
            scales = _finite(layer.prefix + ".scales", p["scales"])
            if gemm:  # [in, out]: groups down the rows
                weight = unpack_nibbles(p["anchor"], AWQ_ORDER).astype(np.float32)
                zeros = unpack_nibbles(p["qzeros"], AWQ_ORDER).astype(np.float32)
                return ((weight - zeros[groups]) * scales[groups]).T
            weight = unpack_nibbles(p["anchor"]).astype(np.float32)  # [out, in]: groups along the row
            zeros = unpack_nibbles(p["qzeros"]).astype(np.float32)
            return (weight - zeros[:, groups]) * scales[:, groups]

        return decode

    return Scheme(
        f"AWQ {bits}-bit ({version.upper()})",
        _bits(bits, group),
        ".qweight",
        {"qzeros": ".qzeros", "scales": ".scales"},
        shape,
        build,
    )


# -- FP8 and compressed-tensors' float/int formats -------------------------------------------
def fp8_e4m3_values() -> np.ndarray:
    """The float value of each of the 256 E4M3 (fn) codes: 1 sign, 4 exponent (bias 7), 3
    mantissa bits, no infinities, NaN only at 0x7F/0xFF."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent, mantissa = (codes >> 3) & 15, codes & 7
    values = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    values = sign * values
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


def fp8_e5m2_values() -> np.ndarray:
    """E5M2 codes: the top byte of a float16."""
    return (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)


FP8 = {"F8_E4M3": fp8_e4m3_values(), "F8_E5M2": fp8_e5m2_values()}
INT_WEIGHTS = ("I8", "U8")


def _spread(values: np.ndarray, rows: int, cols: int, block: list[int] | None) -> np.ndarray:
    """A scale (or zero point) per tensor, row, group of a row or block, as one value per weight
    (or a scalar / a column, which broadcast)."""
    if values.size == 1:
        return values.reshape(())
    if values.size == rows and (values.ndim == 1 or values.shape[1] == 1):
        return values.reshape(rows, 1)
    if block:
        return np.repeat(np.repeat(values, block[0], axis=0), block[1], axis=1)[:rows, :cols]
    return np.repeat(values, cols // values.shape[1], axis=1)


def _scaled_shape(block: list[int] | None) -> Callable[[Layer], tuple[int, ...]]:
    """A weight stored as FP8 or int8 beside a scale per tensor, per row, per group or per block."""

    def shape(layer: Layer) -> tuple[int, ...]:
        weight, scale = layer.parts["weight"], layer.parts["anchor"]
        if not _is(weight, (*FP8, *INT_WEIGHTS)) or len(weight.shape) != 2:
            raise CheckpointError(
                f"{weight.name} is {weight.dtype} of shape {list(weight.shape)}, not an FP8 or int8 matrix"
            )
        rows, cols = weight.shape
        allowed = {(), (1,), (rows,), (rows, 1), (1, 1)}
        if block:
            allowed.add((math.ceil(rows / block[0]), math.ceil(cols / block[1])))
        elif (
            len(scale.shape) == 2 and scale.shape[0] == rows and scale.shape[1] and cols % scale.shape[1] == 0
        ):
            allowed.add(tuple(scale.shape))  # groups along the row
        if tuple(scale.shape) not in allowed or not _is(scale, FLOATS):
            raise CheckpointError(
                f"{scale.name} has shape {list(scale.shape)}, which scales no layout of "
                f"{weight.name}'s {list(weight.shape)}",
                hint="no file was written",
            )
        if "zero_point" in layer.parts:
            _expect(layer, "zero_point", tuple(scale.shape))
        return (rows, cols)

    return shape


def _scaled_decode(block: list[int] | None) -> Callable[[Layer, tuple[int, ...]], Callable]:
    def build(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        rows, cols = shape
        kind = layer.parts["weight"].dtype

        def decode(p: dict[str, np.ndarray]) -> np.ndarray:
            values = FP8[kind][p["weight"]] if kind in FP8 else p["weight"].astype(np.float32)
            if "zero_point" in p:
                values = values - _spread(p["zero_point"].astype(np.float32), rows, cols, block)
            scale = _finite(layer.parts["anchor"].name, p["anchor"].astype(np.float32))
            return values * _spread(scale, rows, cols, block)

        return decode

    return build


def _fp8(config: dict[str, Any]) -> Scheme:
    block = config.get("weight_block_size")
    if block is not None and (
        not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block)
    ):
        raise CheckpointError(f"config.json: weight_block_size is {block!r}, not two positive sizes")
    label = f"FP8 ({block[0]}x{block[1]} blocks)" if block else "FP8"
    return Scheme(
        label,
        8.0,
        ".weight_scale_inv",
        {"weight": ".weight"},
        _scaled_shape(block),
        _scaled_decode(block),
        dropped=(".input_scale", ".activation_scale"),
    )


# -- compressed-tensors ------------------------------------------------------------------------
CT_DROPPED = (
    ".input_scale",
    ".input_zero_point",
    ".output_scale",
    ".output_zero_point",
    ".k_scale",
    ".v_scale",
    ".weight_global_scale",
    ".input_global_scale",
)


def _packed_shape(q: _Groups) -> Callable[[Layer], tuple[int, ...]]:
    def shape(layer: Layer) -> tuple[int, ...]:
        packed = layer.parts["anchor"]
        if len(packed.shape) != 2 or not _is(packed, INTS):
            raise CheckpointError(
                f"{packed.name} is {packed.dtype} of shape {list(packed.shape)}, not a packed int32 matrix"
            )
        rows, cols = packed.shape[0], packed.shape[1] * 32 // q.bits
        stated = layer.parts.get("shape")
        read = getattr(stated, "numpy", None)
        if read is not None:
            if tuple(stated.shape) != (2,) or stated.dtype not in ("I64", "I32"):
                raise CheckpointError(f"{stated.name} is not a weight's two sizes")
            rows, cols = (int(v) for v in read())
            if rows != packed.shape[0] or cols <= 0 or math.ceil(cols * q.bits / 32) != packed.shape[1]:
                raise CheckpointError(
                    f"{packed.name} of shape {list(packed.shape)} cannot hold the "
                    f"{[rows, cols]} {q.bits}-bit weight its weight_shape states"
                )
        groups = _groups(cols, q.group_size)
        _expect(layer, "scale", (rows, groups), FLOATS)
        if "zero_point" in layer.parts:
            _expect(layer, "zero_point", (math.ceil(rows * q.bits / 32), groups), INTS)
        return (rows, cols)

    return shape


def _packed_decode(q: _Groups) -> Callable[[Layer, tuple[int, ...]], Callable]:
    def build(layer: Layer, shape: tuple[int, ...]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        rows, cols = shape

        def decode(p: dict[str, np.ndarray]) -> np.ndarray:
            weight = unpack_rows(p["anchor"], q.bits, cols).astype(np.float32)
            groups = _group_of(cols, q.group_size)
            if "zero_point" in p:  # packed down the columns, like the weight's rows
                zeros = unpack_rows(p["zero_point"].T, q.bits, rows).T.astype(np.float32)[:, groups]
            else:
                zeros = np.float32(1 << (q.bits - 1))  # symmetric: values stored with this offset
            scale = _finite(layer.prefix + ".weight_scale", p["scale"].astype(np.float32))
            return (weight - zeros) * scale[:, groups]

        return decode

    return build


def _compressed_tensors(config: dict[str, Any]) -> Scheme:
    fmt = config.get("format")
    groups = config.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("config.json: compressed-tensors quantization_config has no config_groups")
    weights = [g.get("weights") if isinstance(g, dict) else None for g in groups.values()]
    if len({json.dumps(w, sort_keys=True) for w in weights}) != 1 or not isinstance(weights[0], dict):
        raise CheckpointError(
            "config.json: compressed-tensors groups that quantize weights differently are "
            "not read by edgellm yet",
            hint="convert the model with llm-compressor's one format",
        )
    w = weights[0]
    bits = _int(w.get("num_bits"), "num_bits", (2, 3, 4, 8) if fmt == "pack-quantized" else (8,))
    strategy = w.get("strategy")
    group = _int(w.get("group_size"), "group_size") if strategy == "group" else -1
    if fmt == "pack-quantized":
        if w.get("type", "int") != "int" or strategy not in ("group", "channel"):
            raise CheckpointError(
                f"config.json: pack-quantized {w.get('type')} weights by {strategy} are not read"
            )
        q = _Groups(bits, group)
        return Scheme(
            f"compressed-tensors W{bits}A16",
            _bits(bits, group),
            ".weight_packed",
            {"scale": ".weight_scale"},
            _packed_shape(q),
            _packed_decode(q),
            optional={"shape": ".weight_shape", "zero_point": ".weight_zero_point"},
            dropped=CT_DROPPED,
        )
    if fmt in ("float-quantized", "int-quantized", "naive-quantized"):
        block = w.get("block_structure") if strategy == "block" else None
        if strategy not in ("tensor", "channel", "group", "block"):
            raise CheckpointError(
                f"config.json: compressed-tensors strategy {strategy!r} is not read by edgellm"
            )
        kind = "FP8" if w.get("type") == "float" else "INT8"
        return Scheme(
            f"compressed-tensors {kind}",
            8.0,
            ".weight_scale",
            {"weight": ".weight"},
            _scaled_shape(block),
            _scaled_decode(block),
            optional={"zero_point": ".weight_zero_point"},
            dropped=CT_DROPPED,
        )
    raise CheckpointError(
        f"config.json: compressed-tensors format {fmt!r} is not read by edgellm yet",
        hint="formats read: pack-quantized, float-quantized, int-quantized, naive-quantized",
    )


# -- the registry -----------------------------------------------------------------------------
def _bitsandbytes(config: dict[str, Any]) -> list[Scheme]:
    if config.get("load_in_8bit") or config.get("_load_in_8bit"):
        return [BNB_INT8]
    storage = config.get("bnb_4bit_quant_storage", "uint8")
    if storage != "uint8":
        raise CheckpointError(
            f"config.json: bitsandbytes weights stored as {storage} are not read by edgellm "
            "(only uint8, the default)"
        )
    return [_bnb4("nf4"), _bnb4("fp4")]


METHODS: dict[str, Callable[[dict[str, Any]], Scheme | list[Scheme]]] = {
    "bitsandbytes": _bitsandbytes,
    "gptq": _gptq,
    "awq": _awq,
    "fp8": _fp8,
    "compressed-tensors": _compressed_tensors,
}


#: what a checkpoint stored quantized was (Source), kept in its GGUF for quantize's advice
SOURCE_QUANTIZATION = "edgellm.source.quantization"
SOURCE_BITS = "edgellm.source.bits_per_weight"


@dataclass(frozen=True)
class Source:
    """What a quantized checkpoint was: shown in the converter's summary and kept in the GGUF."""

    label: str
    bits: float
    layers: int


#: methods whose tensors an architecture maps itself (gpt-oss keeps its MXFP4 experts as llama.cpp's)
KEPT_BY_ARCHITECTURE = {"mxfp4"}


def schemes_for(config: dict[str, Any]) -> list[Scheme] | None:
    """The schemes ``config.json``'s quantization_config names: [] for a 16/32-bit checkpoint,
    None for a method the architecture maps itself."""
    qc = config.get("quantization_config")
    if qc is None:
        return []
    if not isinstance(qc, dict):
        raise CheckpointError("config.json: quantization_config is not an object")
    method = str(qc.get("quant_method", "")).lower()
    if method in KEPT_BY_ARCHITECTURE:
        return None
    if method not in METHODS:
        raise CheckpointError(
            f"config.json: quant_method {qc.get('quant_method')!r} is not read by edgellm",
            hint="methods read: " + ", ".join([*METHODS, *KEPT_BY_ARCHITECTURE]),
        )
    made = METHODS[method](qc)
    return made if isinstance(made, list) else [made]


def _stands_for(config: dict[str, Any]) -> str:
    """The dtype a dequantized weight is taken as: bf16 where the checkpoint computes in it."""
    said = (
        config.get("torch_dtype"),
        config.get("dtype"),
        (config.get("quantization_config") or {}).get("bnb_4bit_compute_dtype"),
    )
    return "BF16" if "bfloat16" in map(str, said) else "F16"


def dequantized_view(
    config: dict[str, Any], tensors: dict[str, Stored]
) -> tuple[dict[str, Any], Source | None]:
    """The checkpoint's tensors with each quantized layer's parts replaced by the one weight they
    stand for (a :class:`Dequantized`, read only when asked), every layer's shapes checked. A
    tensor stored as integers or FP8 that no scheme claims is refused: written as it is, it
    would be garbage."""
    schemes = schemes_for(config)
    if schemes is None:
        return dict(tensors), None
    view: dict[str, Any] = dict(tensors)
    found: list[Scheme] = []
    n_layers = 0
    stands_for = _stands_for(config)
    for scheme in schemes:
        layers = scheme.layers(tensors)
        for layer in layers:
            shape = scheme.shape(layer)
            for part in layer.parts.values():
                view.pop(part.name, None)
            name = layer.prefix + ".weight"
            if hasattr(layer.parts["anchor"], "numpy"):
                view[name] = Dequantized(name, shape, stands_for, layer.parts, scheme.decode(layer, shape))
            else:
                view[name] = _Planned(name, None, shape)
        if layers:
            found.append(scheme)
            n_layers += len(layers)
        for name in [n for n in view if scheme.dropped and n.endswith(scheme.dropped)]:
            view.pop(name)
    if schemes and not found:
        raise CheckpointError(
            f"config.json says the weights are quantized ({schemes[0].label}), but no "
            "quantized layer is in the checkpoint"
        )
    for name, ref in view.items():
        if ref.dtype in (*FP8, "I32", "I8", "U8") and len(ref.shape) > 1:
            raise CheckpointError(
                f"tensor {name!r} is stored as {ref.dtype}, and no quantization_config in "
                "config.json says how to read it"
            )
    if not found:
        return view, None
    return view, Source(" + ".join(s.label for s in found), min(s.bits for s in found), n_layers)


@dataclass(frozen=True)
class _Planned:
    """A dequantized weight's name and shape alone, from a remote header (nothing to read)."""

    name: str
    dtype: str | None
    shape: tuple[int, ...]


def logical_shapes(
    config: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the weights a checkpoint stands for, from its headers' shapes alone
    (``pull --plan`` before anything is downloaded): a packed layer counts as the weight it
    dequantizes to."""
    view, _ = dequantized_view(config, {n: _Planned(n, None, tuple(s)) for n, s in shapes.items()})
    return {name: tuple(t.shape) for name, t in view.items()}


#: the suffixes Unsloth and others give a 4-bit repo made from a 16-bit one
FOUR_BIT_SUFFIXES = ("-unsloth-bnb-4bit", "-bnb-4bit", "-bnb-nf4", "-4bit")


def sixteen_bit_base(folder: Path) -> str | None:
    """The 16-bit checkpoint a bitsandbytes 4-bit one was made from, where it says: its model
    card's ``base_model`` (a Hub repo), else its repo name without Unsloth's ``-bnb-4bit``."""
    import re

    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8")[:65536] if card.is_file() else ""
    except (OSError, UnicodeDecodeError):
        text = ""
    front = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    if front:
        found = re.search(
            r"^base_model:\s*(?:\n\s*-\s*)?['\"]?([\w.-]+/[\w.-]+)['\"]?\s*$", front.group(1), re.M
        )
        if found:
            return found.group(1)
    with contextlib.suppress(OSError, ValueError):
        named = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
        if (
            isinstance(named, str)
            and named.endswith(FOUR_BIT_SUFFIXES)
            and re.fullmatch(r"[\w.-]+/[\w.-]+", named)
        ):
            return next(named[: -len(s)] for s in FOUR_BIT_SUFFIXES if named.endswith(s))
    return None
