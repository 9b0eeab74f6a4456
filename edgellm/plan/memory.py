"""What a model costs in memory at a given context, KV type and GPU split, from its header alone.

Every figure follows how llama.cpp itself allocates (checked against the buffer sizes it logs):
weights by the layer they belong to; the KV cache per layer, honouring grouped-query attention,
per-layer head counts, sliding-window layers and quantized block sizes, with the context padded
to 256 cells as llama.cpp pads it; compute buffers from the batch's logits (a row a sequence where
the engine reads them, every token's for perplexity) or else a layer's attention or feed-forward
activations (a mixture of experts' routed ones) and, without flash attention, its attention scores.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from edgellm.gguf.header import ArrayValue, GGUFHeader
from edgellm.options import KV_TYPES

CTX_PAD = 256  # llama.cpp rounds the KV cache up to a multiple of this many cells
#: sliding-window attention: every n-th layer is global, the others see a window (llama.cpp's
#: per-architecture swa patterns)
SWA_PATTERNS = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "llama4": 4, "gpt-oss": 2}
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
    output_bytes: int  # output norm and head: the first layer offloaded
    other_bytes: int
    tied_output_bytes: int = 0  # no output head: llama.cpp copies the token embeddings to where the output runs
    #: a mixture of experts: experts per layer, those a token is routed to, an expert's feed-forward width
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    # Known exactly from a GGUF's layout only (a header planned before conversion lays its tensors
    # out in checkpoint order), so two shapes of the same model compare equal without them.
    #: the head's ggml type, rows, columns (0s: unknown)
    output_weight: tuple[int, int, int] = field(default=(0, 0, 0), compare=False)
    #: (part, file offset, bytes) per tensor, part as in part_of(): where the file maps host tensors
    spans: tuple[tuple[int, int, int], ...] = field(default=(), repr=False, compare=False)
    #: every parameter, and those one token passes through (fewer in a mixture of experts)
    n_params: int = field(default=0, compare=False)
    n_params_active: int = field(default=0, compare=False)

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.input_bytes + self.output_bytes + self.other_bytes

    def resized(self, weight_bytes: int) -> ModelShape:
        """This model with weights of ``weight_bytes`` in all, every part in proportion: another
        quantization of it, planned before its own header is read (a Hub repo's other files)."""
        ratio = weight_bytes / (self.weight_bytes or 1)
        return replace(
            self, layer_bytes=[round(b * ratio) for b in self.layer_bytes],
            repack_bytes=[round(b * ratio) for b in self.repack_bytes], input_bytes=round(self.input_bytes * ratio),
            output_bytes=round(self.output_bytes * ratio), other_bytes=round(self.other_bytes * ratio),
            tied_output_bytes=round(self.tied_output_bytes * ratio), spans=(),
        )

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
        head = next((t for name in ("output.weight", "token_embd.weight") for t in header.tensors if t.name == name), None)
        n_expert, n_used = header.experts or (0, 0)
        spans = tuple((part_of(t.name, n_layer), t.offset, t.nbytes) for t in header.tensors)
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
            output_weight=(head.ggml_type, head.shape[0], head.shape[1]) if head and len(head.shape) == 2 else (0, 0, 0),
            spans=spans,
            n_params=header.parameter_count,
            n_params_active=header.active_parameter_count,
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_exp=int(header.arch_value("expert_feed_forward_length") or n_ff) if n_expert else 0,
            **sizes,
        )


def swa_layers(architecture: str, n_swa: int, n_layer: int) -> list[bool]:
    """Which layers attend through a sliding window: llama.cpp's fixed pattern per architecture."""
    pattern = SWA_PATTERNS.get(architecture)
    return [bool(pattern and n_swa and il % pattern < pattern - 1) for il in range(n_layer)]


INPUT, OUTPUT, OTHER = -1, -2, -3  # parts of a model besides its layers (0 .. n_layer-1)


def part_of(name: str, n_layer: int) -> int:
    """Which part of the model a GGUF tensor belongs to: its layer, or INPUT, OUTPUT, OTHER."""
    match = _LAYER.match(name)
    if match and int(match.group(1)) < n_layer:
        return int(match.group(1))
    if name.startswith("token_embd"):
        return INPUT
    return OUTPUT if name.startswith("output") else OTHER


def bytes_by_part(tensors: Iterable[tuple[str, int, bool]], n_layer: int) -> dict[str, Any]:
    """ModelShape's byte fields from (GGUF tensor name, bytes, repacked on the CPU) triples."""
    layer_bytes, repack = [0] * n_layer, [0] * n_layer
    sums = {INPUT: 0, OUTPUT: 0, OTHER: 0}
    has_head = False
    for name, nbytes, repacked in tensors:
        has_head = has_head or name == "output.weight"
        part = part_of(name, n_layer)
        if part >= 0:
            layer_bytes[part] += nbytes
            repack[part] += nbytes if repacked else 0
        else:
            sums[part] += nbytes
    input_bytes, output_bytes, other = sums[INPUT], sums[OUTPUT], sums[OTHER]
    return dict(layer_bytes=layer_bytes, repack_bytes=repack, input_bytes=input_bytes, output_bytes=output_bytes,
                other_bytes=other, tied_output_bytes=0 if has_head else input_bytes)


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
    op_offload: bool = True
    #: the host weights' span in the file, which llama.cpp maps whole ("CPU_Mapped model buffer"): more
    #: than weights.cpu when offloaded layers lie between host ones; their pages are only read once
    weights_mapped: int = 0

    @property
    def cpu(self) -> int:
        return self.weights.cpu + self.kv.cpu + self.compute.cpu + self.output

    @property
    def gpu(self) -> int:
        return self.weights.gpu + self.kv.gpu + self.compute.gpu

    @property
    def total(self) -> int:
        return self.cpu + self.gpu

    def parts(self) -> dict[str, int]:
        """Each buffer as llama.cpp logs it (llamalog.buffers_by_part), host weights as it maps them."""
        return {"weights.cpu": self.weights_mapped, "weights.gpu": self.weights.gpu, "kv.cpu": self.kv.cpu,
                "kv.gpu": self.kv.gpu, "compute.cpu": self.compute.cpu, "compute.gpu": self.compute.gpu,
                "logits": self.output}


#: the fewest rows an operation on host weights needs for llama.cpp to run it on a GPU (op_offload)
GPU_MIN_BATCH = 32


def engine_outputs(n_seq: int, draft_max: int = 0) -> int:
    """The most logits rows the engine's batch reads at once: one a sequence (its next token, or
    its prompt's last), and one after each of a draft model's guesses."""
    return n_seq * (1 + draft_max)


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
    has_gpu: bool = False,
    output_offload: bool = True,
    op_offload: bool = True,
    n_outputs: int = 0,
) -> MemoryEstimate:
    """Memory for one loaded model and context. ``n_gpu_layers`` counts as llama.cpp counts it: the
    output layer first, then repeating layers from the last one (-1: all of them).

    ``has_gpu``: a GPU is present, which changes more than the offloaded layers: llama.cpp then computes
    every batch of 32 tokens or more on it, copying host weights over (so its compute buffer exists
    even with no layer offloaded), keeps host tensors in its pinned buffer type, and skips the CPU
    repacking. ``output_offload``: the GPU accepts the output matmul (Vulkan refuses a weight larger
    than its storage-buffer range; llama.cpp then keeps the head and the logits in host memory).
    ``op_offload`` off (llama.cpp's context parameter) keeps host layers' batches on the CPU.
    ``n_outputs``: the most logits rows a batch reads (engine_outputs; 0: every token of a
    micro-batch, as perplexity's contexts), which the compute buffer holds.
    """
    n_layer = shape.n_layer
    has_gpu = has_gpu or n_gpu_layers != 0
    ngl = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    first_gpu_layer = n_layer + 1 - ngl  # llama.cpp's i_gpu_start
    bytes_k, bytes_v = KV_TYPES[type_k][1], KV_TYPES[type_v][1]
    repack = repack and not has_gpu

    weights = Placement(cpu=shape.input_bytes + shape.other_bytes)
    kv = Placement()
    kv_per_layer = []
    for il in range(n_layer):
        cells = kv_cells(shape, il, n_ctx, n_ubatch, n_seq, swa_full)
        layer_kv = int(cells * shape.n_head_kv[il] * (shape.head_dim_k * bytes_k + shape.head_dim_v * bytes_v))
        kv_per_layer.append(layer_kv)
        if il >= first_gpu_layer:
            weights += Placement(gpu=shape.layer_bytes[il])
            kv += Placement(gpu=layer_kv)
        else:
            weights += Placement(cpu=shape.layer_bytes[il] + (shape.repack_bytes[il] if repack else 0))
            kv += Placement(cpu=layer_kv)
    head_on_gpu = ngl > 0 and output_offload
    head = shape.output_bytes + shape.tied_output_bytes  # the tied copy shares the host mapping when not moved
    weights += Placement(gpu=head) if head_on_gpu else Placement(cpu=shape.output_bytes)
    on_gpu = has_gpu and (ngl > 0 or (op_offload and n_ubatch >= GPU_MIN_BATCH))
    rows = min(n_outputs, n_ubatch) if n_outputs else n_ubatch
    compute = _compute(shape, n_ctx, flash_attn, ngl, n_ubatch, rows, n_seq, swa_full, on_gpu, output_offload)
    host_parts = {INPUT, OTHER, *range(first_gpu_layer)} | (set() if head_on_gpu else {OUTPUT})
    host_spans = [(offset, offset + nbytes) for part, offset, nbytes in shape.spans if part in host_parts]
    mapped = max(e for _, e in host_spans) - min(s for s, _ in host_spans) if host_spans else weights.cpu
    return MemoryEstimate(
        n_ctx=pad(n_ctx),
        n_gpu_layers=ngl,
        weights=weights,
        kv=kv,
        compute=compute,
        output=shape.n_vocab * 4 * max(n_seq, n_outputs),  # grown to the most rows a batch reads
        kv_per_layer=kv_per_layer,
        op_offload=op_offload,
        weights_mapped=mapped,
    )


def _compute(shape: ModelShape, n_ctx: int, flash_attn: bool, ngl: int, n_ubatch: int, n_rows: int, n_seq: int,
             swa_full: bool, gpu: bool, output_offload: bool) -> Placement:
    """The compute buffers llama.cpp reserves for a worst-case batch of ``n_ubatch`` tokens, ``n_rows``
    of them read out (the allocator's peak over the graph, per backend), as measured against its log
    on CPU and Vulkan."""
    ub, f32 = n_ubatch, 4
    logits = n_rows * (shape.n_vocab + 2 * shape.n_embd) * f32
    # the KQ masks: one over the whole cache, one over the sliding window where layers have one; each
    # sequence attends to its own share of the cache (llama.cpp's streams), so the masks and scores
    # of a batch shared by n_seq sequences are 1/n_seq of one sequence's over all of it
    swa = [kv_cells(shape, il, n_ctx, ub, n_seq, swa_full) for il in range(shape.n_layer) if shape.swa_layers[il]]
    mask_cells = [pad(n_ctx) // n_seq] + [cells // n_seq for cells in swa[:1]]
    masks = sum(mask_cells) * ub * (2 if flash_attn else f32)  # f16 for flash attention's kernels
    # a layer's peak, beside the masks, the residual stream and the token embeddings: its attention
    # (queries, the new keys and values, the heads' output) or its feed-forward activations (those
    # of each expert a token is routed to, and the router's scores, in a mixture of experts)
    heads, kv_heads = max(shape.n_head, default=0), max(shape.n_head_kv, default=0)
    attention = (heads + kv_heads) * (shape.head_dim_k + shape.head_dim_v)
    if shape.n_expert:
        ffn = 3 * shape.n_expert_used * shape.n_ff_exp + 2 * shape.n_expert
    else:
        ffn = 3 * shape.n_ff
    # (the embedding-wide tensors alive beside it: five on the CPU, three on a GPU, as measured)
    work = ub * f32 * (max(attention, ffn) + (3 if gpu else 5) * shape.n_embd) + masks
    if not flash_attn:  # or the attention scores of every head over the whole cache, beside the
        # queries and their weighted values (more than the rest where heads outnumber the embedding,
        # as gpt-oss's 64 of 64 over 2880)
        scores = mask_cells[0] * heads + 4 * shape.n_embd + heads * (shape.head_dim_k + shape.head_dim_v)
        work = max(work, ub * f32 * scores + masks)
    if not gpu:  # everything on the CPU
        return Placement(cpu=max(logits, work))
    host_layers = shape.layer_bytes[: max(shape.n_layer + 1 - ngl, 0)]
    work += max(host_layers, default=0) * 2 // 3  # a host layer's feed-forward weights, copied over for a batch
    inputs = 2 * shape.n_embd * ub * f32 + masks  # token embeddings and their scaled copy, and the masks
    if not flash_attn:
        inputs += 2 * ub * f32 * kv_heads * shape.head_dim_k
    if not output_offload:  # the head and the logits stay on the host, where the inputs were
        return Placement(cpu=max(logits + 2 * shape.n_embd * n_rows * f32, inputs), gpu=work)
    # with no layer offloaded the head stays in host memory, and an output matmul of enough rows for
    # the GPU copies it over
    copied_head = (shape.tied_output_bytes or shape.output_bytes) if ngl == 0 and n_rows >= GPU_MIN_BATCH else 0
    return Placement(cpu=inputs, gpu=max(logits, work) + copied_head)
