"""The architecture table: each family registered once, saying only what differs from Llama.

An architecture turns a HF config into GGUF hyperparameters and maps the checkpoint's tensors to
llama.cpp's (names through ``gguf.TensorNameMap``). An output tensor may be made of several
checkpoint tensors: a mixture-of-experts layer stores one matrix per expert, which llama.cpp
wants stacked into one [n_expert, ...] tensor. Each output's shape is known from the inputs'
shapes alone, so the whole file is laid out before one weight is read, and it is then made from
its inputs one output at a time (one stacked tensor in memory, never the model). A tensor may
also be transformed on its way through (the Q/K row order for llama.cpp's rope layout, Gemma's
``1 + weight`` norms), and tensors llama.cpp wants but HF computes on the fly are added (rope
frequency factors).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import gguf
import numpy as np

from edgellm.errors import CheckpointError, brief
from edgellm.gguf.header import MAX_LAYERS

T = gguf.MODEL_TENSOR

#: HF ``architectures`` name -> the class that converts it
ARCHITECTURES: dict[str, type[Architecture]] = {}


def register(*hf_names: str) -> Callable[[type[Architecture]], type[Architecture]]:
    def add(cls: type[Architecture]) -> type[Architecture]:
        for name in hf_names:
            ARCHITECTURES[name] = cls
        return cls

    return add


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


@dataclass(frozen=True)
class Mapped:
    """One output tensor: its GGUF name, the checkpoint tensors it is made of (in order), its shape
    (numpy order), and how the inputs become it (None: the one input as it is). A tensor the
    checkpoint ships quantized in a type llama.cpp has (gpt-oss's MXFP4 experts) is kept in it:
    ``combine`` then gives its bytes, ``quantized`` the type, and ``dequantize`` the float values
    an explicit --outtype asks for instead."""

    name: str
    sources: tuple[str, ...]
    shape: tuple[int, ...]
    combine: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None
    quantized: gguf.GGMLQuantizationType | None = None
    dequantize: Callable[[Sequence[np.ndarray]], np.ndarray] | None = None


#: the sixteen values of an FP4 (E2M1) code
FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _fp4_codes(blocks: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: each byte holds two, the low nibble first."""
    return np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)


def mxfp4_to_ggml(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Hugging Face's MXFP4 as ggml's ``block_mxfp4`` rows: per block of 32 its E8M0 scale byte,
    then 16 bytes whose low nibbles hold codes 0-15 and high nibbles codes 16-31. A scale of 255 is
    E8M0's NaN, which no real checkpoint holds: refused."""
    if (scales == 255).any():
        raise CheckpointError("an MXFP4 tensor has scales of 255 (NaN in E8M0): the checkpoint is damaged",
                              hint="no file was written")
    codes = _fp4_codes(blocks)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    return np.concatenate([scales[..., None], packed], axis=-1).reshape(*blocks.shape[:-2], -1).astype(np.uint8)


def mxfp4_values(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 dequantized: each code's value times 2^(scale - 127)."""
    values = FP4_VALUES[_fp4_codes(blocks)] * np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def _mxfp4(name: str, sources: tuple[str, str], shape: tuple[int, ...], rows: slice) -> Mapped:
    return Mapped(name, sources, shape, lambda p: mxfp4_to_ggml(p[0][:, rows], p[1][:, rows]),
                  gguf.GGMLQuantizationType.MXFP4, lambda p: mxfp4_values(p[0][:, rows], p[1][:, rows]))


def _stack(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack(parts)


def halves(hf_name: str, shape: tuple[int, ...], names: tuple[str, str]) -> list[Mapped]:
    """A tensor whose second-to-last axis holds two matrices one after the other (a fused gate and
    up projection), cut into the two outputs ``names``."""
    n = shape[-2] // 2
    if shape[-2] != 2 * n:
        raise CheckpointError(f"tensor {hf_name!r} of shape {list(shape)} cannot hold two halves")
    half = (*shape[:-2], n, shape[-1])
    return [Mapped(names[0], (hf_name,), half, lambda parts: parts[0][..., :n, :]),
            Mapped(names[1], (hf_name,), half, lambda parts: parts[0][..., n:, :])]


#: ``model.layers.3.mlp.experts.7.gate_proj.weight`` (Qwen) or ``...block_sparse_moe.experts.7.w1.weight``
_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.([^.]+)\.weight$")
MOE_FFN = (T.FFN_GATE_INP, T.FFN_GATE_EXP, T.FFN_UP_EXP, T.FFN_DOWN_EXP)
SHARED_EXPERT = (T.FFN_GATE_INP_SHEXP, T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)


def _moe(per_block: tuple[T, ...]) -> tuple[T, ...]:
    """A block's tensors with its feed-forward made of experts."""
    return tuple(t for t in per_block if t not in (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)) + MOE_FFN


@dataclass(frozen=True)
class Extra:
    """A tensor llama.cpp needs that the checkpoint does not store; made from the config."""

    name: str
    make: Callable[[], np.ndarray]
    shape: tuple[int, ...]


class Architecture:
    """Llama-family defaults: everything a subclass does not override."""

    arch: ClassVar[gguf.MODEL_ARCH] = gguf.MODEL_ARCH.LLAMA
    #: HF tensors llama.cpp recomputes itself
    skipped: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)
    #: tensors every block must have, checked before writing anything
    per_block: ClassVar[tuple[T, ...]] = (
        T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM, T.FFN_GATE, T.FFN_UP, T.FFN_DOWN,
    )
    #: rows of attn_q / attn_k are reordered for llama.cpp's (non-NeoX) rope
    permute_qk: ClassVar[bool] = True
    #: a vision-language checkpoint: its text model's tensors are converted (see text_part)
    multimodal: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.n_layer = self._int(("num_hidden_layers", "n_layer", "num_layers"), 1, MAX_LAYERS)
        self.n_embd = self._int(("hidden_size", "n_embd", "d_model"), 1, 1 << 20)
        self.n_head = self._int(("num_attention_heads", "n_head"), 1, 1 << 14)
        self.n_head_kv = self._int(("num_key_value_heads",), 1, self.n_head, default=self.n_head)
        self.head_dim = self._int(("head_dim",), 1, 1 << 16, default=self.n_embd // self.n_head or 1)
        self._int(("max_position_embeddings", "n_positions", "max_sequence_length"), 1, 1 << 30, default=1)
        self._int(("intermediate_size", "n_inner"), 0, 1 << 22, default=0)
        theta = self.rope.get("rope_theta")
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not math.isfinite(theta) or theta <= 0:
            raise CheckpointError(f"config.json: rope_theta is {brief(theta)}, not a finite number above 0")
        eps = self.config.get("rms_norm_eps", self.config.get("layer_norm_epsilon", 0.0))
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps < 0:
            raise CheckpointError(f"config.json: the norm epsilon is {brief(eps)}, not a finite number of at least 0")
        self.n_expert = self._int(("num_local_experts", "num_experts"), 0, 1 << 12, default=0)
        if self.n_expert:
            self.n_expert_used = self._int(("num_experts_per_tok",), 1, self.n_expert)
            self.n_ff_expert = self._int(("moe_intermediate_size", "intermediate_size"), 1, 1 << 22)
        self.names = gguf.get_tensor_name_map(self.arch, self.n_layer)

    def _int(self, keys: tuple[str, ...], low: int, high: int, default: int | None = None) -> int:
        """An integer hyperparameter of config.json, in the range llama.cpp can load (as the GGUF
        validator checks it): refused at once, before a million layers are planned or written."""
        value = next((self.config[k] for k in keys if self.config.get(k) is not None), default)
        if value is None:
            raise CheckpointError(f"config.json lacks {keys[0]}")
        if not isinstance(value, int) or isinstance(value, bool):
            raise CheckpointError(f"config.json: {keys[0]} is {brief(value)}, not an integer")
        if not low <= value <= high:
            raise CheckpointError(f"config.json: {keys[0]} is {value}, outside {low}..{high}")
        return value

    def _get(self, *keys: str) -> Any:
        for key in keys:
            if self.config.get(key) is not None:
                return self.config[key]
        raise KeyError(keys[0])

    @property
    def rope(self) -> dict[str, Any]:
        """Rope settings, from transformers 5's ``rope_parameters`` or the older flat keys."""
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        params = params.get("full_attention", params) if isinstance(params, dict) else None
        if not isinstance(params, dict):
            raise CheckpointError("config.json: rope_parameters is not an object")
        return {"rope_theta": self.config.get("rope_theta", 10000.0), **params}

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        c = self.config
        if self.n_expert:
            w.add_expert_count(self.n_expert)
            w.add_expert_used_count(self.n_expert_used)
            if c.get("moe_intermediate_size") is not None:
                w.add_expert_feed_forward_length(self.n_ff_expert)
        w.add_context_length(int(self._get("max_position_embeddings", "n_positions", "max_sequence_length")))
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_feed_forward_length(self.feed_forward_length)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
        w.add_rope_dimension_count(self.rope_dims)
        w.add_layer_norm_rms_eps(float(self._get("rms_norm_eps", "layer_norm_epsilon")))
        w.add_rope_freq_base(float(self.rope["rope_theta"]))
        rope_type = self.rope_type()
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(self.rope["factor"]))
        elif rope_type == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(self.rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
        elif rope_type not in ("default", "llama3"):  # llama3's scaling travels as rope_freqs (extras)
            raise CheckpointError(f"rope scaling {rope_type!r} is not supported for {type(self).__name__}")
        if c.get("vocab_size"):
            w.add_vocab_size(int(c["vocab_size"]))

    @property
    def rope_dims(self) -> int:
        return self.head_dim

    @property
    def feed_forward_length(self) -> int:
        """The dense MLP's width."""
        return int(self._get("intermediate_size", "n_inner"))

    def rope_type(self) -> str:
        return self.rope.get("rope_type") or self.rope.get("type") or "default"

    def map_tensors(self, shapes: dict[str, tuple[int, ...]]) -> list[Mapped]:
        """Every output tensor, from the checkpoint's tensor names and shapes: one for each HF
        tensor, except experts, which are gathered per layer and weight into one stacked tensor
        (all ``n_expert`` of them, of one shape, or the checkpoint is refused)."""
        out, experts = [], {}
        for hf_name, shape in shapes.items():
            if (parts := self.split(hf_name, shapes)) is not None:
                missing = [src for part in parts for src in part.sources if src not in shapes]
                if missing:
                    raise CheckpointError(f"the checkpoint has {hf_name} but lacks {missing[0]}",
                                          hint="is the download complete?")
                out += parts
                continue
            if match := _EXPERT.match(hf_name):
                experts.setdefault((match.group(1), match.group(3)), {})[int(match.group(2))] = hf_name
                continue
            name = self.gguf_name(hf_name)
            if name is not None:
                out.append(Mapped(name, (hf_name,), shape))
        for (prefix, weight), members in experts.items():
            if sorted(members) != list(range(self.n_expert)):
                raise CheckpointError(f"{prefix}.N.{weight} is there for experts {_ranges(sorted(members))}, but "
                                      f"config.json says {self.n_expert}", hint="is the download complete?")
            sources = tuple(members[i] for i in range(self.n_expert))
            kinds = {shapes[s] for s in sources}
            if len(kinds) != 1:
                raise CheckpointError(f"the experts of {prefix}.*.{weight} differ in shape: {sorted(kinds)}")
            name = self.gguf_name(f"{prefix}.{weight}.weight")
            if name is not None:
                out.append(Mapped(name, sources, (self.n_expert, *kinds.pop()), _stack))
        return out

    def split(self, hf_name: str, shapes: dict[str, tuple[int, ...]]) -> list[Mapped] | None:
        """The outputs a fused checkpoint tensor is cut into (none when it is read with another
        tensor's), or None when it maps as it is."""
        return None

    def model_name(self, name: str, vocab_model: str) -> str:
        """general.name as written (llama.cpp reads some model families' token quirks from it)."""
        return name

    def gguf_name(self, hf_name: str) -> str | None:
        """llama.cpp's name for a HF tensor, or None when it is skipped."""
        if self.multimodal and (hf_name := text_part(hf_name)) is None:
            return None
        if hf_name.endswith(self.skipped):
            return None
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"tensor {hf_name!r} has no place in a {self.arch.name.lower()} GGUF")
        return name

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        if self.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return _permute(data, self.n_head)
        if self.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return _permute(data, self.n_head_kv)
        return data

    def require_experts(self) -> None:
        """A family that is only ever a mixture of experts: a config without them is not one."""
        if not self.n_expert:
            raise CheckpointError("config.json: num_local_experts is missing or 0")

    def check_nope_every_fourth(self) -> None:
        """A family whose every fourth layer has no rope (NoPE), the only pattern llama.cpp's graph
        for it runs: a config that says otherwise is refused."""
        pattern = self.config.get("no_rope_layers")
        if pattern is not None and list(pattern) != [int((i + 1) % 4 != 0) for i in range(self.n_layer)]:
            raise CheckpointError(f"config.json: no_rope_layers is not every fourth layer, the only pattern "
                                  f"llama.cpp's {self.arch.name.lower()} runs")

    def check_routing(self, normalizes: bool) -> None:
        """Refuse a mixture-of-experts config whose routing llama.cpp's graph for this family does
        not compute: it would load and answer wrongly."""
        said = bool(self.config.get("norm_topk_prob", normalizes))
        if said != normalizes:
            raise CheckpointError(
                f"config.json sets norm_topk_prob {str(said).lower()}; llama.cpp's {self.arch.name.lower()} "
                f"{'always' if normalizes else 'never'} renormalizes the chosen experts' weights")
        if self.config.get("mlp_only_layers") or self.config.get("decoder_sparse_step", 1) != 1:
            raise CheckpointError("config.json makes some layers dense (mlp_only_layers, decoder_sparse_step); "
                                  f"llama.cpp's {self.arch.name.lower()} has experts in every layer")

    def extras(self) -> list[Extra]:
        if self.rope_type() != "llama3":
            return []
        n = self.head_dim // 2
        return [Extra(gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", lambda: _llama3_rope_factors(self.rope, self.head_dim), (n,))]

    def required(self) -> set[str]:
        out = {gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight"}
        for bid in range(self.n_layer):
            out.update(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight" for t in self.per_block)
        return out

    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        """The numpy shape the config implies, to catch a tensor that does not fit the model."""
        q, kv, e = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.n_embd
        ff = self.config.get("intermediate_size")
        shapes = {
            "attn_q.weight": (q, e), "attn_k.weight": (kv, e), "attn_v.weight": (kv, e),
            "attn_output.weight": (e, q), "attn_norm.weight": (e,), "ffn_norm.weight": (e,),
            "ffn_gate.weight": (ff, e), "ffn_down.weight": (e, ff), "ffn_up.weight": (ff, e),
            "attn_q_norm.weight": (self.head_dim,), "attn_k_norm.weight": (self.head_dim,),
        }
        if self.n_expert:
            n, ffe, shared = self.n_expert, self.n_ff_expert, self.config.get("shared_expert_intermediate_size")
            shapes.update({
                "ffn_gate_inp.weight": (n, e), "ffn_gate_exps.weight": (n, ffe, e), "ffn_up_exps.weight": (n, ffe, e),
                "ffn_down_exps.weight": (n, e, ffe), "ffn_gate_inp_shexp.weight": (1, e),
                "ffn_gate_shexp.weight": (shared, e), "ffn_up_shexp.weight": (shared, e),
                "ffn_down_shexp.weight": (e, shared),
            })
        if gguf_name == "output_norm.weight":
            return (e,)
        if gguf_name in ("token_embd.weight", "output.weight"):
            return (None, e)
        return shapes.get(gguf_name.split(".", 2)[-1]) if gguf_name.startswith("blk.") else None


def text_part(hf_name: str) -> str | None:
    """A vision-language checkpoint's tensor by its text model's name (``model.language_model.`` in
    transformers 5, ``language_model.model.`` before), or None for the vision tower and projector,
    which are not ours to convert (llama.cpp keeps them in a separate mmproj file)."""
    if hf_name.startswith(("vision_tower.", "vision_model.", "multi_modal_projector.", "model.vision_tower.",
                           "model.vision_model.", "model.multi_modal_projector.")):
        return None
    return hf_name.replace("language_model.model.", "model.").replace("model.language_model.", "model.") \
        .replace("language_model.lm_head.", "lm_head.")


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> ``0-2, 5``: which experts a checkpoint holds, short."""
    spans: list[list[int]] = []
    for i in ids:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans) or "none"


def _permute(data: np.ndarray, n_head: int) -> np.ndarray:
    """HF keeps each head's rotary halves apart; llama.cpp wants them interleaved in pairs."""
    rows = data.shape[0]
    return (
        data.reshape(n_head, 2, rows // n_head // 2, *data.shape[1:])
        .swapaxes(1, 2)
        .reshape(data.shape)
    )


def _llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1's frequency-dependent rope scaling, as the factors llama.cpp divides by."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Architecture):
    pass


@register("Qwen2ForCausalLM")
class Qwen2(Architecture):
    arch = gguf.MODEL_ARCH.QWEN2
    permute_qk = False


@register("Qwen3ForCausalLM")
class Qwen3(Architecture):
    arch = gguf.MODEL_ARCH.QWEN3
    permute_qk = False
    per_block = Architecture.per_block + (T.ATTN_Q_NORM, T.ATTN_K_NORM)


@register("MixtralForCausalLM")
class Mixtral(Architecture):
    """Llama with experts (``block_sparse_moe``): llama.cpp's llama graph, top-k renormalized."""

    per_block = _moe(Architecture.per_block)


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(Qwen2):
    """Experts beside one shared expert, whose output a sigmoid gate scales."""

    arch = gguf.MODEL_ARCH.QWEN2MOE
    per_block = _moe(Qwen2.per_block) + SHARED_EXPERT

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.check_routing(normalizes=False)

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        shared = self._int(("shared_expert_intermediate_size",), 1, 1 << 22)
        w.add_expert_shared_feed_forward_length(shared)


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Qwen3):
    arch = gguf.MODEL_ARCH.QWEN3MOE
    per_block = _moe(Qwen3.per_block)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.check_routing(normalizes=True)


@register("GemmaForCausalLM")
class Gemma(Architecture):
    arch = gguf.MODEL_ARCH.GEMMA
    permute_qk = False

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight
        return data + 1.0 if gguf_name.endswith("norm.weight") else data


@register("Gemma2ForCausalLM")
class Gemma2(Gemma):
    arch = gguf.MODEL_ARCH.GEMMA2
    per_block = Gemma.per_block + (T.ATTN_POST_NORM, T.FFN_POST_NORM)

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        for key, add in (("attn_logit_softcapping", w.add_attn_logit_softcapping),
                         ("final_logit_softcapping", w.add_final_logit_softcapping)):
            if self.config.get(key):
                add(float(self.config[key]))
        if self.config.get("sliding_window"):
            w.add_sliding_window(int(self.config["sliding_window"]))


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3(Gemma2):
    arch = gguf.MODEL_ARCH.GEMMA3
    per_block = Gemma2.per_block + (T.ATTN_Q_NORM, T.ATTN_K_NORM)
    multimodal = True  # Gemma3ForConditionalGeneration nests the text model


@register("Phi3ForCausalLM")
class Phi3(Architecture):
    arch = gguf.MODEL_ARCH.PHI3
    permute_qk = False
    per_block = (T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN)

    @property
    def rope_dims(self) -> int:
        return int(self.rope.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
                   * self.n_embd) // self.n_head

    def model_name(self, name: str, vocab_model: str) -> str:
        """llama.cpp gives any model named "phi-3" or "phi3" Phi-3's SentencePiece token quirks and
        fails on a vocabulary without ``</s>``; Phi-4 keeps Phi-3's architecture with a GPT-2-style
        vocabulary, so such a checkpoint is named "Phi 3" for it instead."""
        return re.sub(r"(?i)phi-?3", "Phi 3", name) if vocab_model != "llama" else name

    def rope_type(self) -> str:
        kind = super().rope_type()
        return "default" if kind in ("longrope", "su") else kind  # longrope travels as factor tensors

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        orig = self.config.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(int(orig))
            ctx = int(self.config["max_position_embeddings"])
            if self.extras() and ctx > orig:
                w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(ctx / orig) / math.log(orig)))
        if self.config.get("sliding_window"):
            w.add_sliding_window(int(self.config["sliding_window"]))

    def extras(self) -> list[Extra]:
        long, short = self.rope.get("long_factor"), self.rope.get("short_factor")
        if not long or not short:
            return []
        n = self.rope_dims // 2
        if len(long) != n or len(short) != n:
            raise CheckpointError(f"rope long/short factors must have {n} values each")
        return [
            Extra(gguf.TENSOR_NAMES[T.ROPE_FACTORS_LONG] + ".weight", lambda: np.asarray(long, np.float32), (n,)),
            Extra(gguf.TENSOR_NAMES[T.ROPE_FACTORS_SHORT] + ".weight", lambda: np.asarray(short, np.float32), (n,)),
        ]

    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        q, kv, e = self.n_head * self.head_dim, self.n_head_kv * self.head_dim, self.n_embd
        ff = self.config.get("intermediate_size")
        if gguf_name.endswith("attn_qkv.weight"):
            return (q + 2 * kv, e)
        if gguf_name.endswith("ffn_up.weight"):
            return (2 * ff, e)
        return super().expected_shape(gguf_name)


@register("Mistral3ForConditionalGeneration")
class Mistral3(Architecture):
    """Mistral Small 3.x: a Mistral text model beside a Pixtral vision tower; the text part."""

    arch = gguf.MODEL_ARCH.MISTRAL3
    multimodal = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        kind = config.get("model_type")
        if kind not in ("mistral", "mistral3"):
            raise CheckpointError(f"a Mistral 3 checkpoint whose text model is {brief(kind)}; edgellm converts "
                                  "those with a Mistral text model (Mistral Small 3.x)")


@register("Llama4ForConditionalGeneration", "Llama4ForCausalLM")
class Llama4(Architecture):
    """Llama 4's text model: dense and expert layers interleaved, each expert layer with a shared
    expert; experts stored fused (gate and up side by side, each transposed), cut apart and
    transposed here; every fourth layer without rope. llama.cpp fixes chunked attention at 8192
    tokens and the attention temperature at 8192/0.1, so a config that differs is refused."""

    arch = gguf.MODEL_ARCH.LLAMA4
    permute_qk = False
    multimodal = True  # Llama4ForConditionalGeneration nests the text model beside its vision model

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        c = config
        self.step = self._int(("interleave_moe_layer_step",), 1, MAX_LAYERS, default=1)
        self.dense_ff = self._int(("intermediate_size_mlp",), 1, 1 << 22)
        fixed = {"attention_chunk_size": 8192, "floor_scale": 8192, "attn_scale": 0.1}
        for key, value in fixed.items():
            if c.get(key) is not None and c[key] != value:
                raise CheckpointError(f"config.json: {key} is {brief(c[key])}; llama.cpp's llama4 fixes it at {value}")
        self.check_nope_every_fourth()
        if self.n_expert and bool(c.get("use_qk_norm", True)) != (self.n_expert != 128):
            raise CheckpointError("config.json: use_qk_norm disagrees with llama.cpp's llama4, which norms Q and K in "
                                  "all but the 128-expert model")

    @property
    def feed_forward_length(self) -> int:
        return self.dense_ff

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        w.add_interleave_moe_layer_step(self.step)
        if self.n_expert and self.config.get("moe_intermediate_size") is None:
            w.add_expert_feed_forward_length(self.n_ff_expert)
        if all(kind == "full_attention" for kind in self.config.get("layer_types") or ["chunked"]):
            w.add_sliding_window(0)

    def is_moe_layer(self, bid: int) -> bool:
        return bool(self.n_expert) and (bid + 1) % self.step == 0

    def required(self) -> set[str]:
        out = {gguf.TENSOR_NAMES[T.TOKEN_EMBD] + ".weight", gguf.TENSOR_NAMES[T.OUTPUT_NORM] + ".weight"}
        attention = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.FFN_NORM)
        for bid in range(self.n_layer):
            ffn = MOE_FFN + (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP) if self.is_moe_layer(bid) \
                else (T.FFN_GATE, T.FFN_UP, T.FFN_DOWN)
            out.update(gguf.TENSOR_NAMES[t].format(bid=bid) + ".weight" for t in attention + ffn)
        return out

    def split(self, hf_name: str, shapes: dict[str, tuple[int, ...]]) -> list[Mapped] | None:
        text, shape = text_part(hf_name), shapes[hf_name]
        if text is None or not text.endswith(("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")):
            return None
        base = text.rsplit(".", 1)[0]
        if text.endswith("down_proj"):  # [E, F, D] -> [E, D, F]
            name = self.gguf_name(f"{base}.down_proj.weight")
            return [Mapped(name, (hf_name,), (shape[0], shape[2], shape[1]), lambda p: p[0].swapaxes(-1, -2))]
        n = shape[-1] // 2  # [E, D, 2F]: gate then up along the last axis
        gate, up = self.gguf_name(f"{base}.gate_proj.weight"), self.gguf_name(f"{base}.up_proj.weight")
        half = (shape[0], n, shape[1])
        return [Mapped(gate, (hf_name,), half, lambda p: p[0][..., :n].swapaxes(-1, -2)),
                Mapped(up, (hf_name,), half, lambda p: p[0][..., n:].swapaxes(-1, -2))]

    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        e, f = self.n_embd, self.n_ff_expert
        shared = {"ffn_gate_shexp.weight": (f, e), "ffn_up_shexp.weight": (f, e), "ffn_down_shexp.weight": (e, f),
                  "ffn_gate.weight": (self.dense_ff, e), "ffn_up.weight": (self.dense_ff, e),
                  "ffn_down.weight": (e, self.dense_ff)}
        return shared.get(gguf_name.split(".", 2)[-1]) or super().expected_shape(gguf_name)


@register("GptOssForCausalLM")
class GptOss(Architecture):
    """gpt-oss: experts with biases, stored fused (gate and up interleaved column by column, each
    transposed), attention sinks, every other layer a sliding window (as llama.cpp assumes)."""

    arch = gguf.MODEL_ARCH.GPT_OSS
    permute_qk = False
    per_block = (T.ATTN_NORM, T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_SINKS, T.ATTN_POST_NORM) + MOE_FFN

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.require_experts()
        self.window = self._int(("sliding_window",), 1, 1 << 30)
        kinds = config.get("layer_types")
        if kinds is not None and list(kinds) != [("sliding_attention", "full_attention")[i % 2]
                                                 for i in range(self.n_layer)]:
            raise CheckpointError("config.json: layer_types is not sliding and full attention in turn, the only "
                                  "pattern llama.cpp's gpt-oss runs")

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        w.add_sliding_window(self.window)
        w.add_expert_feed_forward_length(self.n_ff_expert)

    def gguf_name(self, hf_name: str) -> str | None:
        return super().gguf_name(hf_name + ".weight" if hf_name.endswith("self_attn.sinks") else hf_name)

    def split(self, hf_name: str, shapes: dict[str, tuple[int, ...]]) -> list[Mapped] | None:
        base, _, part = hf_name.rpartition(".")
        shape = shapes[hf_name]
        if not base.endswith("mlp.experts"):
            return None
        names = {kind: {s: self.gguf_name(f"{base}.{kind}_proj.{s}") for s in ("weight", "bias")}
                 for kind in ("gate", "up", "down")}
        if part == "gate_up_proj":  # [E, D, 2F], gate and up alternating along the last axis
            half = (shape[0], shape[2] // 2, shape[1])
            return [Mapped(names["gate"]["weight"], (hf_name,), half, lambda p: p[0][..., ::2].swapaxes(-1, -2)),
                    Mapped(names["up"]["weight"], (hf_name,), half, lambda p: p[0][..., 1::2].swapaxes(-1, -2))]
        if part == "gate_up_proj_bias":  # [E, 2F]
            half = (shape[0], shape[1] // 2)
            return [Mapped(names["gate"]["bias"], (hf_name,), half, lambda p: p[0][..., ::2]),
                    Mapped(names["up"]["bias"], (hf_name,), half, lambda p: p[0][..., 1::2])]
        if part == "down_proj":  # [E, F, D] -> [E, D, F]
            return [Mapped(names["down"]["weight"], (hf_name,), (shape[0], shape[2], shape[1]),
                           lambda p: p[0].swapaxes(-1, -2))]
        if part == "down_proj_bias":
            return [Mapped(names["down"]["bias"], (hf_name,), shape)]
        if part.endswith("_scales"):
            return []  # read with its blocks
        if part in ("gate_up_proj_blocks", "down_proj_blocks"):
            # MXFP4 as released: [E, rows, blocks, 16 bytes] beside [E, rows, blocks] scales, rows
            # already the output dimension (gate and up alternating), so no transposition
            scales = f"{base}.{part.replace('_blocks', '_scales')}"
            if len(shape) != 4 or shape[3] != 16 or tuple(shapes.get(scales, ())) != shape[:3]:
                raise CheckpointError(f"{hf_name} {list(shape)} and {scales} {list(shapes.get(scales, ()))} are not "
                                      "MXFP4 blocks and their scales")
            n, rows, cols = shape[0], shape[1], shape[2] * 32
            if part == "down_proj_blocks":
                return [_mxfp4(names["down"]["weight"], (hf_name, scales), (n, rows, cols), slice(None))]
            half = (n, rows // 2, cols)
            return [_mxfp4(names["gate"]["weight"], (hf_name, scales), half, slice(0, None, 2)),
                    _mxfp4(names["up"]["weight"], (hf_name, scales), half, slice(1, None, 2))]
        return None


@register("SmolLM3ForCausalLM")
class SmolLM3(Architecture):
    """Llama whose every fourth layer has no rotary embedding (NoPE): llama.cpp assumes that step."""

    arch = gguf.MODEL_ARCH.SMOLLM3

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.check_nope_every_fourth()


@register("Olmo2ForCausalLM")
class Olmo2(Architecture):
    """Norms after attention and the MLP instead of before, and Q/K norms over the whole projection."""

    arch = gguf.MODEL_ARCH.OLMO2
    permute_qk = False
    per_block = (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT, T.ATTN_Q_NORM, T.ATTN_K_NORM, T.ATTN_POST_NORM,
                 T.FFN_GATE, T.FFN_UP, T.FFN_DOWN, T.FFN_POST_NORM)

    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        if gguf_name.endswith("attn_q_norm.weight"):
            return (self.n_head * self.head_dim,)
        if gguf_name.endswith("attn_k_norm.weight"):
            return (self.n_head_kv * self.head_dim,)
        return super().expected_shape(gguf_name)


@register("GraniteForCausalLM")
class Granite(Architecture):
    """Llama with four scalars: embeddings, residuals, attention scores and logits are scaled."""

    arch = gguf.MODEL_ARCH.GRANITE
    _SCALES = (("attention_multiplier", "add_attention_scale"), ("embedding_multiplier", "add_embedding_scale"),
               ("residual_multiplier", "add_residual_scale"), ("logits_scaling", "add_logit_scale"))

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        for key, add in self._SCALES:
            value = self.config.get(key)
            if value is not None:
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                    raise CheckpointError(f"config.json: {key} is {brief(value)}, not a finite number")
                getattr(w, add)(float(value))


@register("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
class GraniteMoe(Granite):
    """Granite with experts stored fused: ``input_linear`` holds each expert's gate and up
    projections one after the other, cut apart here as llama.cpp keeps them; an optional shared
    MLP is fused the same way."""

    arch = gguf.MODEL_ARCH.GRANITE_MOE
    per_block = _moe(Architecture.per_block)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.require_experts()
        self.n_ff_expert = self._int(("intermediate_size",), 1, 1 << 22)
        self.shared = self._int(("shared_intermediate_size",), 0, 1 << 22, default=0)
        if self.shared:
            self.per_block = self.per_block + (T.FFN_GATE_SHEXP, T.FFN_UP_SHEXP, T.FFN_DOWN_SHEXP)

    def hyperparameters(self, w: gguf.GGUFWriter) -> None:
        super().hyperparameters(w)
        if self.shared:
            w.add_expert_shared_feed_forward_length(self.shared)

    def split(self, hf_name: str, shapes: dict[str, tuple[int, ...]]) -> list[Mapped] | None:
        bid, shape = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None, shapes[hf_name]
        if hf_name.endswith("block_sparse_moe.input_linear.weight"):
            return halves(hf_name, shape, (f"blk.{bid}.ffn_gate_exps.weight", f"blk.{bid}.ffn_up_exps.weight"))
        if hf_name.endswith("shared_mlp.input_linear.weight"):
            return halves(hf_name, shape, (f"blk.{bid}.ffn_gate_shexp.weight", f"blk.{bid}.ffn_up_shexp.weight"))
        return None

    def expected_shape(self, gguf_name: str) -> tuple[int, ...] | None:
        e, s = self.n_embd, self.shared
        shapes = {"ffn_gate_shexp.weight": (s, e), "ffn_up_shexp.weight": (s, e), "ffn_down_shexp.weight": (e, s)}
        return shapes.get(gguf_name.split(".", 2)[-1]) or super().expected_shape(gguf_name)


def architecture_for(config: dict[str, Any]) -> Architecture:
    """The table's entry for the checkpoint. Repo code (``auto_map``) never runs: a known
    architecture is converted by our own code even where the repo ships its own (Phi-3 does);
    an unknown one would need the repo's code, trust_remote_code, and is refused as such."""
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name](config)
    if config.get("auto_map"):
        raise CheckpointError(
            f"{', '.join(names) or 'this model'} needs trust_remote_code (its config.json maps to code shipped in "
            "the repo), which edgellm never runs",
            hint=f"edgellm converts: {supported()}",
        )
    raise CheckpointError(
        f"architecture {', '.join(names) or '(none named in config.json)'} is not supported",
        hint=f"edgellm converts: {supported()}",
    )
