"""The training-memory planner: what a LoRA, QLoRA or full fine-tune of a checkpoint needs, part
by part, and whether it fits this machine — before anything is loaded.

A pure function of the model's shape (from its config.json), the run's settings and the machine:

- weights: bf16, or fp32 on a CPU without bf16 units (where 16-bit matmuls are slow), or NF4 for
  QLoRA: 4 bits per weight of every linear layer plus its block constants (one fp32 per 64
  weights, or with double quantization one byte per 64 and one fp32 per 256 blocks); embeddings
  and norms stay unquantized;
- the adapter: r x (in + out) parameters per targeted linear layer, fp32, with its gradients and
  AdamW's two fp32 moments (8-bit AdamW: one byte each), or, for a full fine-tune, all of those
  for every weight;
- activations: what autograd keeps per token for the backward pass (every layer's, or with
  gradient checkpointing each layer's input and one layer's at a time), and the logits of the
  learned tokens with their softmax and gradient;
- the framework: Python with torch, transformers and PEFT loaded (in RAM), or the CUDA context.

On a CPU the peak that matters is the process's resident memory: glibc keeps freed activation
memory for reuse, which ``CPU_ALLOCATOR`` accounts for (measured on real runs; bench/finetune.py
and tests/test_finetune.py hold the planner to within 10% of the peak). On a GPU the figures are
torch's own allocations (``max_memory_allocated``), with the CUDA context on top.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from edgellm.errors import UsageError

GiB = 1 << 30
MiB = 1 << 20

#: resident memory of a Python process with torch, transformers and PEFT imported (CPU runs)
CPU_FRAMEWORK = 440 * MiB
#: the CUDA context and torch's kernels on a GPU, which max_memory_allocated does not count
CUDA_CONTEXT = 600 * MiB
#: how much more than the live activations a CPU run keeps resident: freed blocks glibc holds for
#: reuse and the backward pass's temporaries, by the base's dtype (bf16 runs keep their norms' fp32
#: copies too). Measured: SmolLM2 and Gemma 3, batch 1-4, 128-256 tokens, ranks 16 and 64
CPU_ALLOCATOR = {"fp32": 2.0, "bf16": 2.3}
#: the same for a GPU run: torch's caching allocator holds the backward pass's temporaries
GPU_ALLOCATOR = 1.25
#: layers' activations a CPU run with gradient checkpointing holds at once in the backward pass
#: (the recomputed layer's, its gradients, and what the allocator keeps; measured on SmolLM2)
GC_LIVE_LAYERS = 10
#: the largest batch --batch auto picks: more rows a step means fewer steps an epoch, and small data
#: sets learn from steps
MAX_AUTO_BATCH = 8
#: NF4 bits per weight with its block constants: 4 + 32/64, or with double quantization 4 + 8/64 + 32/(64*256)
NF4_BITS = {False: 4.5, True: 4 + 8 / 64 + 32 / (64 * 256)}
#: bytes per parameter of AdamW's state: two fp32 moments, or two 8-bit ones with block constants
OPTIMIZER_BYTES = {
    "adamw": 8.0,
    "adamw-8bit": 2.0 + 2 * 4 / 256,
    "paged-adamw-8bit": 2.0 + 2 * 4 / 256,
    "paged-adamw": 8.0,
}


@dataclass(frozen=True)
class TrainShape:
    """What memory depends on in a decoder checkpoint: sizes from its config.json."""

    arch: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0  # routed experts per layer (0: dense)
    checkpoint_bytes: int = 0  # the weight files' size, when known: loading maps them while converting

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TrainShape:
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else config
        try:
            hidden = int(text["hidden_size"])
            heads = int(text["num_attention_heads"])
            return cls(
                arch=str((config.get("architectures") or [config.get("model_type", "?")])[0]),
                layers=int(text["num_hidden_layers"]),
                hidden=hidden,
                intermediate=int(text.get("moe_intermediate_size") or text["intermediate_size"]),
                heads=heads,
                kv_heads=int(text.get("num_key_value_heads") or heads),
                head_dim=int(text.get("head_dim") or hidden // heads),
                vocab=int(text["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
                experts=int(text.get("num_experts") or text.get("num_local_experts") or 0),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise UsageError(
                f"the checkpoint's config.json lacks a model size the planner needs ({exc})"
            ) from None

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer kind in one block, as PEFT names them."""
        e, f, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return {
            "q_proj": (e, q),
            "k_proj": (e, kv),
            "v_proj": (e, kv),
            "o_proj": (q, e),
            "gate_proj": (e, f),
            "up_proj": (e, f),
            "down_proj": (f, e),
        }

    def linear_params(self) -> int:
        per_mlp = 3 * self.hidden * self.intermediate
        mlps = max(self.experts, 1)
        attn = sum(
            i * o
            for k, (i, o) in self.linears().items()
            if k.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
        )
        return self.layers * (attn + per_mlp * mlps)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    def other_params(self) -> int:
        """Norms and the like: small, never quantized."""
        return self.layers * 4 * self.hidden + self.hidden

    @property
    def params(self) -> int:
        return self.linear_params() + self.embedding_params() + self.other_params()

    def lora_params(self, rank: int, targets: tuple[str, ...] | None) -> int:
        chosen = {k: v for k, v in self.linears().items() if targets is None or k in targets}
        mlps = max(self.experts, 1)
        return self.layers * sum(
            rank * (i + o) * (mlps if k in ("gate_proj", "up_proj", "down_proj") else 1)
            for k, (i, o) in chosen.items()
        )

    def activation_floats(self, rank: int) -> int:
        """Floats autograd keeps per token per layer in a LoRA-adapted block: the norms' inputs and
        outputs, q/k/v with rotary embeddings, the attention output (K and V expanded to every
        head), the MLP's gate, up, activation and product, and each adapter's low-rank output."""
        e, f, q, kv = (
            self.hidden,
            self.intermediate,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )
        return 4 * e + 4 * f + 7 * q + 3 * kv + 7 * rank


@dataclass(frozen=True)
class TrainSettings:
    """The choices a run's memory depends on."""

    method: str = "lora"  # lora, qlora or full
    rank: int = 16
    targets: tuple[str, ...] | None = None  # None: every linear layer (all-linear)
    max_len: int = 1024
    batch: int = 1
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    double_quant: bool = True
    trained_share: float = 1.0  # the share of tokens the loss is on (the logits kept for it)
    device: str = "cpu"  # cpu or cuda
    dtype: str = ""  # the base's weights and activations: fp32 or bf16 ("": fp32 on a CPU, bf16 on a GPU)

    @property
    def compute_dtype(self) -> str:
        return self.dtype or ("fp32" if self.device == "cpu" else "bf16")

    @property
    def tokens(self) -> int:
        return self.batch * self.max_len


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class TrainPlan:
    shape: TrainShape
    settings: TrainSettings
    parts: tuple[Part, ...]
    available: int  # the memory the run draws on: free RAM on a CPU, free VRAM on a GPU
    where: str  # "RAM" or "VRAM"

    @property
    def total(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def fits(self) -> bool:
        return self.total <= self.available

    def part(self, name: str) -> int:
        return next((p.bytes for p in self.parts if p.name == name), 0)

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "method": s.method,
            "dtype": s.compute_dtype,
            "rank": s.rank,
            "max_len": s.max_len,
            "batch": s.batch,
            "gradient_checkpointing": s.gradient_checkpointing,
            "optimizer": s.optimizer,
            "device": s.device,
            "parts": {p.name: p.bytes for p in self.parts},
            "total": self.total,
            "available": self.available,
            "where": self.where,
            "fits": self.fits,
        }


def plan_training(shape: TrainShape, settings: TrainSettings, available: int) -> TrainPlan:
    """Every part of a run's memory; ``available`` is the free memory of the device it runs on."""
    s = settings
    cpu = s.device == "cpu"
    dense = 4 if s.compute_dtype == "fp32" else 2  # bytes per unquantized weight, and per activation
    n_linear, n_rest = shape.linear_params(), shape.embedding_params() + shape.other_params()
    if s.method == "qlora":
        weights = int(n_linear * NF4_BITS[s.double_quant] / 8) + n_rest * dense
        note = f"NF4{' + double quant' if s.double_quant else ''} linear layers, the rest {8 * dense}-bit"
    else:
        weights, note = (n_linear + n_rest) * dense, f"{8 * dense}-bit"
    trained = shape.params if s.method == "full" else shape.lora_params(s.rank, s.targets)
    optimizer = int(trained * OPTIMIZER_BYTES[s.optimizer])
    per_token = shape.activation_floats(0 if s.method == "full" else s.rank) * dense
    factor = CPU_ALLOCATOR[s.compute_dtype] if cpu else GPU_ALLOCATOR
    if s.gradient_checkpointing:
        live = GC_LIVE_LAYERS if cpu else 1
        activations = s.tokens * (shape.layers * shape.hidden * dense + live * per_token) * factor
        act_note = "checkpointed: each layer's input, and the layers being recomputed"
    else:
        activations = s.tokens * shape.layers * per_token * factor
        act_note = f"{shape.layers} layers x {s.tokens} tokens"
    learned = math.ceil(s.tokens * min(max(s.trained_share, 0.0), 1.0))
    logits = learned * shape.vocab * 4 * 3  # logits, their log-softmax and its gradient, fp32
    # bitsandbytes on a CPU without bf16 units dequantizes each 4-bit weight to fp32 for every
    # matmul; glibc keeps those freed copies for reuse, so about one fp32 copy stays resident
    dequantized = n_linear * 4 if s.method == "qlora" and cpu and s.compute_dtype == "fp32" else 0
    parts = (
        Part("weights", weights, note),
        Part("dequantize buffers", dequantized, "fp32 copies of the 4-bit weights, held by the allocator"),
        Part(
            "adapter",
            0 if s.method == "full" else trained * 4,
            "none: every weight is trained" if s.method == "full" else f"{trained:,} parameters, fp32",
        ),
        Part("gradients", trained * (dense if s.method == "full" else 4)),
        Part("optimizer", optimizer, s.optimizer),
        Part("activations", int(activations), act_note),
        Part("logits", logits, f"{learned} learned tokens x {shape.vocab} vocabulary"),
        Part(
            "framework",
            CPU_FRAMEWORK if cpu else CUDA_CONTEXT,
            "Python, torch, transformers, PEFT" if cpu else "CUDA context",
        ),
    )
    converts = abs(shape.checkpoint_bytes / max(shape.params, 1) - dense) > 0.5  # fp32 files into bf16, ...
    if cpu and shape.checkpoint_bytes and s.method != "qlora" and converts:
        # loading maps the weight files and converts them: for a moment both are resident
        training = sum(p.bytes for p in parts)
        loading = CPU_FRAMEWORK + shape.checkpoint_bytes + weights
        parts += (
            Part(
                "loading headroom",
                max(0, loading - training),
                "the checkpoint's files and the converted weights at once, while loading",
            ),
        )
    return TrainPlan(shape, s, parts, available, "RAM" if cpu else "VRAM")


def auto_batch(shape: TrainShape, settings: TrainSettings, available: int) -> int:
    """The largest batch (up to MAX_AUTO_BATCH) that fits; 0 when not even one example does."""
    best = 0
    for batch in range(1, MAX_AUTO_BATCH + 1):
        if not plan_training(shape, replace(settings, batch=batch), available).fits:
            break
        best = batch
    return best


def nearest_fit(shape: TrainShape, settings: TrainSettings, available: int) -> TrainSettings | None:
    """The closest settings that fit when these do not: gradient checkpointing first (slower, same
    result), then a smaller batch, then 4-bit weights, then shorter sequences; None if none does."""
    tries = [replace(settings, gradient_checkpointing=True)]
    tries += [replace(tries[0], batch=b) for b in range(settings.batch - 1, 0, -1)]
    base = replace(tries[-1], batch=1)
    if settings.method == "lora":
        tries.append(replace(base, method="qlora"))
        base = tries[-1]
    length = settings.max_len
    while length > 128:
        length //= 2
        tries.append(replace(base, max_len=length))
    return next((t for t in tries if plan_training(shape, t, available).fits), None)
