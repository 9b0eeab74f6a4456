"""Quantized checkpoints made from the real SmolLM2 checkpoint, as the Hub publishes them.

bitsandbytes quantizes on the CPU through transformers (the library itself). GPTQ, AWQ, FP8 and
compressed-tensors are written here from their published layouts, with round-to-nearest in
place of the calibrated search (the layout is what a reader depends on), packing with
compressed-tensors' own ``pack_to_int32`` where the layouts agree (GPTQ's, 3-bit included, is
the same dense little-endian stream). Each maker returns the checkpoint folder and, for the
written formats, the weights the packed layers stand for (``expected``): what a reader must get.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def copy_side_files(src: Path, dest: Path) -> None:
    """A checkpoint's files other than its config and weights (tokenizer, chat template) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.safetensors") and f.name != "config.json":
            shutil.copy(f, dest / f.name)


def bnb_checkpoint(src: Path, dest: Path, kind: str) -> Path:
    """``kind``: nf4, nf4-dq (double quantization), fp4, int8; saved by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=kind.split("-")[0],
            bnb_4bit_use_double_quant=kind.endswith("-dq"),
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu")
    model.save_pretrained(dest)
    copy_side_files(src, dest)  # the tokenizer and chat template
    return dest


def _linears(src: Path) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(config, the tensors kept as they are, the linear layers' weights to quantize)."""
    from safetensors.numpy import load_file

    config = json.loads((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    linears = {name: w for name, w in tensors.items() if _is_linear(name)}
    return config, {k: v for k, v in tensors.items() if k not in linears}, linears


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _save(dest: Path, src: Path, config: dict, tensors: dict) -> None:
    import torch
    from safetensors.torch import save_file

    copy_side_files(src, dest)
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    save_file(
        {
            k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))
            for k, v in tensors.items()
        },
        dest / "model.safetensors",
    )


def _grouped(w: np.ndarray, bits: int, group: int, sym: bool, g_idx: np.ndarray, least_zero: int = 0):
    """Round-to-nearest of w [out, in] in groups of inputs (g_idx gives each input's group):
    (integer values [out, in], scales [groups, out], zeros [groups, out]). GPTQ's v1 layout
    stores a zero point less one, so it cannot hold 0 (``least_zero`` 1 keeps it out)."""
    n_groups = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    scales = np.empty((n_groups, w.shape[0]), np.float16)
    zeros = np.empty((n_groups, w.shape[0]), np.int32)
    q = np.empty(w.shape, np.int32)
    for g in range(n_groups):
        cols = np.nonzero(g_idx == g)[0]
        block = w[:, cols]
        lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
        if sym:
            amax = np.maximum(np.abs(lo), hi)
            scale = np.where(amax == 0, 1, 2 * amax / maxq)
            zero = np.full(w.shape[0], (maxq + 1) // 2)
        else:
            scale = np.where(hi == lo, 1, (hi - lo) / maxq)
            zero = np.maximum(np.round(-lo / scale), least_zero)
        scale = scale.astype(np.float16)
        scales[g], zeros[g] = scale, zero
        q[:, cols] = np.clip(np.round(block / scale.astype(np.float32)[:, None]) + zero[:, None], 0, maxq)
    return q, scales, zeros


def _pack(values: np.ndarray, bits: int, dim: int) -> np.ndarray:
    """Unsigned ``bits``-bit values packed densely into int32 along ``dim`` (compressed-tensors'
    packer, which stores value + 2^(bits-1) of the signed values it is given)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    signed = torch.from_numpy((values.astype(np.int32) - (1 << (bits - 1))).astype(np.int8))
    return pack_to_int32(signed, bits, packed_dim=dim).numpy()


def gptq_checkpoint(
    src: Path,
    dest: Path,
    bits: int,
    group: int = 32,
    desc_act: bool = False,
    sym: bool = True,
    v2: bool = False,
) -> tuple[Path, dict[str, np.ndarray]]:
    config, out, linears = _linears(src)
    rng = np.random.default_rng(bits)
    expected = {}
    for name, w in linears.items():
        prefix, n_in = name[: -len(".weight")], w.shape[1]
        order = rng.permutation(n_in) if desc_act else np.arange(n_in)
        g_idx = np.empty(n_in, np.int32)
        g_idx[order] = np.arange(n_in) // group
        q, scales, zeros = _grouped(w, bits, group, sym, g_idx, least_zero=0 if v2 else 1)
        expected[name] = (scales[g_idx].astype(np.float32).T * (q - zeros[g_idx].T)).astype(np.float32)
        stored_zeros = zeros if v2 else (zeros - 1) & ((1 << bits) - 1)
        out[prefix + ".qweight"] = _pack(q.T, bits, 0)  # [in * bits / 32, out]
        out[prefix + ".qzeros"] = _pack(stored_zeros, bits, 1)  # [groups, out * bits / 32]
        out[prefix + ".scales"] = scales
        out[prefix + ".g_idx"] = g_idx
    config["quantization_config"] = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group,
        "desc_act": desc_act,
        "sym": sym,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
    }
    _save(dest, src, config, out)
    return dest, expected


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_pack(values: np.ndarray, order: tuple[int, ...]) -> np.ndarray:
    """[rows, cols] 4-bit values -> [rows, cols / 8] int32, nibble i of word j holding column
    8j + order[i] (AutoAWQ's pack loop)."""
    values = values.astype(np.uint32).reshape(values.shape[0], -1, 8)
    packed = np.zeros(values.shape[:2], np.uint32)
    for i, col in enumerate(order):
        packed |= values[:, :, col] << np.uint32(4 * i)
    return packed.view(np.int32)


def awq_checkpoint(
    src: Path, dest: Path, version: str = "gemm", group: int = 64
) -> tuple[Path, dict[str, np.ndarray]]:
    config, out, linears = _linears(src)
    expected = {}
    for name, w in linears.items():
        prefix, (n_out, n_in) = name[: -len(".weight")], w.shape
        g_idx = np.arange(n_in) // group
        q, scales, zeros = _grouped(w, 4, group, False, g_idx)
        expected[name] = ((q - zeros[g_idx].T) * scales[g_idx].astype(np.float32).T).astype(np.float32)
        if version == "gemm":
            out[prefix + ".qweight"] = _awq_pack(q.T, AWQ_ORDER)  # [in, out / 8]
            out[prefix + ".qzeros"] = _awq_pack(zeros, AWQ_ORDER)  # [groups, out / 8]
            out[prefix + ".scales"] = scales  # [groups, out]
        else:  # GEMV: rows are outputs, zero points and scales padded to whole words
            width = -(-(n_in // group) // 8)
            zeros_padded = np.zeros((n_out, width * 8), np.int32)
            zeros_padded[:, : zeros.shape[0]] = zeros.T
            scales_padded = np.zeros((n_out, width * 8), np.float16)
            scales_padded[:, : scales.shape[0]] = scales.T
            out[prefix + ".qweight"] = _awq_pack(q, tuple(range(8)))
            out[prefix + ".qzeros"] = _awq_pack(zeros_padded, tuple(range(8)))
            out[prefix + ".scales"] = scales_padded
    config["quantization_config"] = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group,
        "zero_point": True,
        "version": version,
    }
    _save(dest, src, config, out)
    return dest, expected


def fp8_checkpoint(
    src: Path, dest: Path, block: tuple[int, int] | None = (64, 64)
) -> tuple[Path, dict[str, np.ndarray]]:
    """DeepSeek/Qwen FP8 layout: E4M3 weights beside ``weight_scale_inv`` per block (or one per
    tensor when ``block`` is None)."""
    import torch

    config, out, linears = _linears(src)
    expected = {}
    for name, w in linears.items():
        t = torch.from_numpy(w)
        if block:
            rows, cols = -(-w.shape[0] // block[0]), -(-w.shape[1] // block[1])
            padded = torch.zeros(rows * block[0], cols * block[1])
            padded[: w.shape[0], : w.shape[1]] = t
            tiles = padded.reshape(rows, block[0], cols, block[1])
            scale = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
            full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[
                : w.shape[0], : w.shape[1]
            ]
        else:
            scale = (t.abs().max() / 448.0).reshape(())
            full = scale
        q = (t / full).to(torch.float8_e4m3fn)
        expected[name] = (q.float() * full).numpy()
        out[name] = q
        out[name + "_scale_inv"] = scale.float()
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        **({"weight_block_size": list(block)} if block else {}),
    }
    _save(dest, src, config, out)
    return dest, expected


def compressed_tensors_checkpoint(src: Path, dest: Path, scheme: str) -> tuple[Path, dict[str, np.ndarray]]:
    """llm-compressor's layouts: ``w4a16`` (pack-quantized, symmetric groups of 32), ``w4a16-asym``
    (with packed zero points), ``w8a8`` (int8 per channel), ``fp8`` (float-quantized per channel)."""
    import torch

    config, out, linears = _linears(src)
    expected = {}
    bits, group = (4, 32) if scheme.startswith("w4") else (8, None)
    sym = scheme != "w4a16-asym"
    for name, w in linears.items():
        prefix = name[: -len(".weight")]
        if scheme == "fp8":
            t = torch.from_numpy(w)
            scale = (t.abs().amax(dim=1, keepdim=True) / 448.0).clamp(min=1e-12).to(torch.bfloat16)
            q = (t / scale.float()).to(torch.float8_e4m3fn)
            expected[name] = (q.float() * scale.float()).numpy()
            out[name], out[name + "_scale"] = q, scale
            continue
        n_in = w.shape[1]
        g_idx = np.arange(n_in) // (group or n_in)
        q, scales, zeros = _grouped(w, bits, group or n_in, sym, g_idx)
        expected[name] = (scales[g_idx].astype(np.float32).T * (q - zeros[g_idx].T)).astype(np.float32)
        if scheme == "w8a8":
            out[name] = (q - zeros[g_idx].T).astype(np.int8)
            out[name + "_scale"] = scales.T.copy()  # [out, 1]
            continue
        out[prefix + ".weight_packed"] = _pack(q, bits, 1)
        out[prefix + ".weight_scale"] = scales.T.copy()
        out[prefix + ".weight_shape"] = np.array(w.shape, np.int64)
        if not sym:
            out[prefix + ".weight_zero_point"] = _pack(zeros.T, bits, 0)
    weights = {
        "num_bits": bits,
        "type": "float" if scheme == "fp8" else "int",
        "symmetric": sym,
        "strategy": "group" if group else "channel",
        "group_size": group,
    }
    fmt = {"fp8": "float-quantized", "w8a8": "int-quantized"}.get(scheme, "pack-quantized")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
        "quantization_status": "compressed",
    }
    _save(dest, src, config, out)
    return dest, expected
