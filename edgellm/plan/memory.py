"""What a model costs in memory at a given context, KV type and GPU split, from its header alone.

Every figure follows how llama.cpp itself allocates (checked against the buffer sizes it logs):
weights by the layer they belong to; the KV cache per layer, honouring grouped-query attention,
per-layer head counts, sliding-window layers and quantized block sizes, with the context padded
to 256 cells as llama.cpp pads it; compute buffers from the batch's logits and, without flash
attention, its attention scores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgellm.models.header import ArrayValue, GGUFHeader
from edgellm.runtime.options import KV_TYPES

CTX_PAD = 256  # llama.cpp rounds the KV cache up to a multiple of this many cells
#: sliding-window attention: every n-th layer is global, the others see a window (llama.cpp's
#: per-architecture swa patterns)
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "llama4": 4}
#: tensor types llama.cpp's CPU backend repacks into an extra interleaved copy (x86 with AVX2)
REPACKED_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def pad(n: int, multiple: int = CTX_PAD) -> int:
    return (n + multiple - 1) // multiple * multiple


def _per_layer(value, n_layer: int, default: int) -> list[int]:
    if isinstance(value, ArrayValue):
        values = list(value.values or ())
        return values if len(values) == n_layer else [values[0] if values else default] * n_layer
    return [value if isinstance(value, int) else default] * n_layer


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters memory depends on, read once from the header."""

    architecture: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_head: list[int]
    n_head_kv: list[int]
    head_dim_k: int
    head_dim_v: int
    swa_layers: list[bool]
    n_swa: int
    layer_bytes: list[int]
    repack_bytes: list[int]  # per layer: the extra copy llama.cpp's CPU backend makes
    input_bytes: int  # token embeddings: always in host memory
    output_bytes: int  # output norm and head: offloaded only with every layer
    other_bytes: int

    @classmethod
    def from_header(cls, header: GGUFHeader) -> ModelShape:
        n_layer = int(header.arch_value("block_count") or 0)
        n_embd = int(header.arch_value("embedding_length") or 0)
        n_head = _per_layer(header.arch_value("attention.head_count"), n_layer, 1)
        n_head_kv = _per_layer(header.arch_value("attention.head_count_kv"), n_layer, n_head[0] if n_head else 1)
        head_dim = n_embd // max(n_head[0], 1) if n_head else 0
        ff = header.arch_value("feed_forward_length")
        n_ff = max(_per_layer(ff, n_layer, 0)) if n_layer else 0
        n_swa = int(header.arch_value("attention.sliding_window") or 0)
        sizes = bytes_by_part(((t.name, t.nbytes, t.type_name in REPACKED_TYPES and len(t.shape) == 2)
                               for t in header.tensors), n_layer)
        return cls(
            architecture=header.architecture,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=n_ff,
            n_vocab=int(header.n_vocab or 0),
            n_ctx_train=int(header.context_length or 0),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=int(header.arch_value("attention.key_length") or head_dim),
            head_dim_v=int(header.arch_value("attention.value_length") or head_dim),
            swa_layers=swa_layers(header.architecture, n_swa, n_layer),
            n_swa=n_swa,
            **sizes,
        )


def swa_layers(architecture: str, n_swa: int, n_layer: int) -> list[bool]:
    """Which layers attend through a sliding window: llama.cpp's fixed pattern per architecture."""
    pattern = SWA_PATTERNS.get(architecture)
    return [bool(pattern and n_swa and il % pattern < pattern - 1) for il in range(n_layer)]


def bytes_by_part(tensors: Iterable[tuple[str, int, bool]], n_layer: int) -> dict[str, Any]:
    """ModelShape's byte fields from (GGUF tensor name, bytes, repacked on the CPU) triples."""
    layer_bytes, repack = [0] * n_layer, [0] * n_layer
    input_bytes = output_bytes = other = 0
    for name, nbytes, repacked in tensors:
        match = _LAYER.match(name)
        if match and int(match.group(1)) < n_layer:
            layer_bytes[int(match.group(1))] += nbytes
            if repacked:
                repack[int(match.group(1))] += nbytes
        elif name.startswith("token_embd"):
            input_bytes += nbytes
        elif name.startswith("output"):
            output_bytes += nbytes
        else:
            other += nbytes
    return dict(layer_bytes=layer_bytes, repack_bytes=repack, input_bytes=input_bytes, output_bytes=output_bytes,
                other_bytes=other)


@dataclass(frozen=True)
class Placement:
    """Bytes that go to host memory and to the GPU(s)."""

    cpu: int = 0
    gpu: int = 0

    @property
    def total(self) -> int:
        return self.cpu + self.gpu

    def __add__(self, other: Placement) -> Placement:
        return Placement(self.cpu + other.cpu, self.gpu + other.gpu)


@dataclass(frozen=True)
class MemoryEstimate:
    n_ctx: int  # as llama.cpp will allocate it (padded)
    n_gpu_layers: int
    weights: Placement
    kv: Placement
    compute: Placement
    output: int  # the logits buffer llama.cpp keeps in host memory
    kv_per_layer: list[int] = field(repr=False)

    @property
    def cpu(self) -> int:
        return self.weights.cpu + self.kv.cpu + self.compute.cpu + self.output

    @property
    def gpu(self) -> int:
        return self.weights.gpu + self.kv.gpu + self.compute.gpu

    @property
    def total(self) -> int:
        return self.cpu + self.gpu


def kv_cells(shape: ModelShape, layer: int, n_ctx: int, n_ubatch: int, n_seq: int, swa_full: bool) -> int:
    """KV cells llama.cpp gives a layer: the context, or for a sliding-window layer its window."""
    n_ctx = pad(n_ctx)
    if shape.swa_layers[layer] and not swa_full:
        return min(n_ctx, pad(shape.n_swa * n_seq + n_ubatch))
    return n_ctx


def estimate(
    shape: ModelShape,
    n_ctx: int,
    type_k: str = "f16",
    type_v: str = "f16",
    flash_attn: bool = True,
    n_gpu_layers: int = 0,
    n_ubatch: int = 512,
    n_seq: int = 1,
    swa_full: bool = True,
    repack: bool = True,
) -> MemoryEstimate:
    """Memory for one loaded model and context. ``n_gpu_layers`` -1 means all (with the output)."""
    n_layer = shape.n_layer
    ngl = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    first_gpu_layer = max(n_layer - ngl, 0)
    bytes_k, bytes_v = KV_TYPES[type_k][1], KV_TYPES[type_v][1]

    weights = Placement(cpu=shape.input_bytes + shape.other_bytes)
    kv = Placement()
    kv_per_layer = []
    for il in range(n_layer):
        cells = kv_cells(shape, il, n_ctx, n_ubatch, n_seq, swa_full)
        layer_kv = int(cells * shape.n_head_kv[il] * (shape.head_dim_k * bytes_k + shape.head_dim_v * bytes_v))
        kv_per_layer.append(layer_kv)
        if il >= first_gpu_layer and ngl > 0:
            weights += Placement(gpu=shape.layer_bytes[il])
            kv += Placement(gpu=layer_kv)
        else:
            weights += Placement(cpu=shape.layer_bytes[il] + (shape.repack_bytes[il] if repack else 0))
            kv += Placement(cpu=layer_kv)
    output_on_gpu = ngl > n_layer
    weights += Placement(gpu=shape.output_bytes) if output_on_gpu else Placement(cpu=shape.output_bytes)

    # compute buffers: the batch's logits dominate; without flash attention, so can the
    # attention scores of every head over the whole context
    logits = n_ubatch * (shape.n_vocab + 2 * shape.n_embd) * 4
    attention = 0
    if not flash_attn:
        attention = n_ubatch * 4 * (pad(n_ctx) * (max(shape.n_head) + 1) + 2 * shape.n_ff + shape.n_embd)
    if ngl == 0:
        compute = Placement(cpu=max(logits, attention))
    else:
        layer_work = max(attention, n_ubatch * 4 * (2 * shape.n_ff + shape.n_embd))
        gpu = max(logits, layer_work) if output_on_gpu else layer_work
        cpu = n_ubatch * shape.n_embd * 4 * 2 if output_on_gpu else logits
        compute = Placement(cpu=cpu, gpu=gpu)
    return MemoryEstimate(
        n_ctx=pad(n_ctx),
        n_gpu_layers=ngl,
        weights=weights,
        kv=kv,
        compute=compute,
        output=shape.n_vocab * 4 * n_seq,
        kv_per_layer=kv_per_layer,
    )
