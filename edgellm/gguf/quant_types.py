"""Quantization types llama.cpp can write, with what each costs: a table the store, the Hub
listing, the planner and the quantizer all read, so it lives below all of them.

``bpw`` is the whole-model bits per weight llama-quantize reports for Llama-3-8B (K-quant mixes keep
some tensors at higher precision, so they sit above their block format's nominal rate); the note
is llama-quantize's own size and perplexity cost on that model.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgellm.errors import UsageError
from edgellm.gguf.ggml_types import GGML_TYPES


@dataclass(frozen=True)
class QuantType:
    name: str
    ftype: int  # llama_ftype
    bpw: float
    note: str
    needs_imatrix: bool = False  # llama.cpp refuses it without an importance matrix


_TYPES = [
    QuantType("Q2_K", 10, 3.17, "2.96G, +3.5199 ppl @ Llama-3-8B"),
    QuantType("Q3_K_S", 11, 3.65, "3.41G, +1.6321 ppl @ Llama-3-8B"),
    QuantType("Q3_K_M", 12, 4.00, "3.74G, +0.6569 ppl @ Llama-3-8B"),
    QuantType("Q3_K_L", 13, 4.31, "4.03G, +0.5562 ppl @ Llama-3-8B"),
    QuantType("Q4_K_S", 14, 4.67, "4.37G, +0.2689 ppl @ Llama-3-8B"),
    QuantType("Q4_K_M", 15, 4.90, "4.58G, +0.1754 ppl @ Llama-3-8B"),
    QuantType("Q5_K_S", 16, 5.57, "5.21G, +0.1049 ppl @ Llama-3-8B"),
    QuantType("Q5_K_M", 17, 5.70, "5.33G, +0.0569 ppl @ Llama-3-8B"),
    QuantType("Q6_K", 18, 6.57, "6.14G, +0.0217 ppl @ Llama-3-8B"),
    QuantType("Q8_0", 7, 8.50, "7.96G, +0.0026 ppl @ Llama-3-8B"),
    QuantType("Q4_0", 2, 4.64, "4.34G, +0.4685 ppl @ Llama-3-8B"),
    QuantType("Q4_1", 3, 5.11, "4.78G, +0.4511 ppl @ Llama-3-8B"),
    QuantType("Q5_0", 8, 5.57, "5.21G, +0.1316 ppl @ Llama-3-8B"),
    QuantType("Q5_1", 9, 6.04, "5.65G, +0.1062 ppl @ Llama-3-8B"),
    QuantType("IQ4_NL", 25, 4.50, "4.50 bpw non-linear quantization"),
    QuantType("IQ4_XS", 30, 4.25, "4.25 bpw non-linear quantization"),
    QuantType("F16", 1, 16.0, "14.00G, +0.0020 ppl @ Mistral-7B"),
    QuantType("BF16", 32, 16.0, "14.00G, -0.0050 ppl @ Mistral-7B"),
    QuantType("F32", 0, 32.0, "26.00G @ 7B"),
    QuantType("IQ3_M", 27, 3.66, "3.66 bpw quantization mix"),
    QuantType("IQ3_S", 26, 3.44, "3.44 bpw quantization"),
    QuantType("IQ3_XS", 22, 3.30, "3.3 bpw quantization"),
    QuantType("IQ3_XXS", 23, 3.06, "3.06 bpw quantization", needs_imatrix=True),
    QuantType("Q2_K_S", 21, 3.17, "2.96G, +3.1836 ppl @ Llama-3-8B", needs_imatrix=True),
    QuantType("IQ2_M", 29, 2.70, "2.7 bpw quantization", needs_imatrix=True),
    QuantType("IQ2_S", 28, 2.50, "2.5 bpw quantization", needs_imatrix=True),
    QuantType("IQ2_XS", 20, 2.31, "2.31 bpw quantization", needs_imatrix=True),
    QuantType("IQ2_XXS", 19, 2.06, "2.06 bpw quantization", needs_imatrix=True),
    QuantType("IQ1_M", 31, 1.75, "1.75 bpw quantization", needs_imatrix=True),
    QuantType("IQ1_S", 24, 1.56, "1.56 bpw quantization", needs_imatrix=True),
]
QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in _TYPES}
_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


def quant_type(name: str) -> QuantType:
    """Look a type up case-insensitively; refuse unknown ones."""
    key = _ALIASES.get(name.strip().upper(), name.strip().upper())
    found = QUANT_TYPES.get(key)
    if found is None:
        raise UsageError(f"unknown quantization type {name!r}", hint=f"choose one of {', '.join(QUANT_TYPES)}")
    return found


def is_quant_suffix(text: str) -> bool:
    """Whether a store-name suffix (``smollm2-q4_k_m`` -> ``q4_k_m``) names a quantization type."""
    key = text.upper()
    return key in QUANT_TYPES or key in _ALIASES


def main_ggml_type(qtype: QuantType) -> tuple[int, str]:
    """The ggml tensor type (id, name) most of a model's weights get in this file type: Q4_K for
    Q4_K_M, IQ4_XS for itself; what a planned, not yet written, GGUF is sized with."""
    ids = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
    name = _MAIN_TYPES.get(qtype.name) or (qtype.name if qtype.name in ids else qtype.name.rsplit("_", 1)[0])
    return ids[name], name


#: file types whose name is not their main tensor type's, nor that name with a size suffix
_MAIN_TYPES = {"IQ3_M": "IQ3_S", "IQ3_XS": "IQ3_S", "IQ2_M": "IQ2_S"}
