"""PEFT LoRA adapters: merged into the base weights as they stream, or written as a GGUF LoRA.

A merge is W' = W + scale · B·A for each module the adapter targets, in float32, one tensor at a
time (PEFT's merge_and_unload builds the whole merged model in memory first). Every adapter is
checked against the base before anything is written: its architecture, each module's shapes and
rank, and that the base has every module the adapter targets.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.convert.archs import architecture_for
from edgellm.convert.checkpoint import (
    PICKLE_SUFFIXES,
    Checkpoint,
    SafetensorsFile,
    TensorRef,
    check_links,
)
from edgellm.convert.writer import ConvertResult, Progress, write_streamed
from edgellm.errors import Cancelled, CheckpointError, UsageError
from edgellm.fsutil import atomic_dir

PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: delta = scale · B·A (transposed for embeddings and fan_in_fan_out)."""

    module: str
    a: TensorRef
    b: TensorRef
    scale: float
    transpose: bool

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def out_in(self) -> tuple[int, int]:
        """The (rows, cols) of the base weight this delta adds to."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)

    def delta(self) -> np.ndarray:
        d = (self.b.numpy() @ self.a.numpy()) * np.float32(self.scale)
        return d.T if self.transpose else d


class Adapter:
    """A PEFT adapter folder: adapter_config.json and adapter_model.safetensors."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder = Path(folder)
        if folder.is_dir():
            check_links(folder)
        try:
            self.config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{folder} has no adapter_config.json: not a PEFT adapter") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {folder / 'adapter_config.json'}: {exc}") from None
        c = self.config
        if c.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{folder.name} is a {c['peft_type']} adapter; edgellm merges LoRA adapters")
        if c.get("use_dora"):
            raise CheckpointError(
                f"{folder.name} is a DoRA adapter, which edgellm does not merge",
                hint="merge it with PEFT's merge_and_unload, then convert the merged checkpoint",
            )
        weights = folder / "adapter_model.safetensors"
        if not weights.is_file():
            pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
            why = f" ({pickles[0]} is a pickle, which edgellm refuses)" if pickles else ""
            raise CheckpointError(f"{folder.name} has no adapter_model.safetensors{why}")
        self.file = SafetensorsFile(weights)
        self.rank, self.alpha = int(c.get("r", 8)), float(c.get("lora_alpha", 8))
        self.pairs: dict[str, LoraPair] = {}
        self.replaced: dict[str, TensorRef] = {}  # modules_to_save: whole tensors that replace the base's
        found: dict[str, dict[str, TensorRef]] = {}
        embeddings: set[str] = set()
        for key, ref in self.file.tensors.items():
            name = key.removeprefix(PREFIX)
            match = LORA_KEY.match(name)
            if match:
                found.setdefault(match["module"], {})[match["kind"].replace("embedding_", "")] = ref
                if "embedding" in match["kind"]:
                    embeddings.add(match["module"])
            elif "lora_magnitude_vector" in name:
                raise CheckpointError(f"{folder.name} holds DoRA magnitudes; edgellm does not merge DoRA")
            else:  # modules_to_save, or the base embedding PEFT saves beside an embedding LoRA
                self.replaced[name.replace(".modules_to_save.default", "").replace(".base_layer", "")] = ref
        for module, parts in found.items():
            if set(parts) != {"lora_A", "lora_B"}:
                missing = ({"lora_A", "lora_B"} - set(parts)).pop()
                raise CheckpointError(f"adapter {folder.name} lacks {missing} for module {module}")
            a, b = parts["lora_A"], parts["lora_B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise CheckpointError(
                    f"adapter {folder.name}: rank mismatch in module {module}: lora_A {list(a.shape)}, lora_B {list(b.shape)}"
                )
            r = a.shape[0]
            expected_r = self._pattern("rank_pattern", module, self.rank)
            if r != expected_r:
                raise CheckpointError(
                    f"adapter {folder.name}: rank mismatch in module {module}: adapter_config.json says r={expected_r}, "
                    f"its weights have rank {r}"
                )
            alpha = float(self._pattern("alpha_pattern", module, self.alpha))
            scale = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
            self.pairs[module] = LoraPair(module, a, b, scale, bool(c.get("fan_in_fan_out")) or module in embeddings)
        targets = c.get("target_modules") or []
        if isinstance(targets, list):
            for target in targets:
                if not any(m == target or m.endswith("." + target) for m in self.pairs):
                    raise CheckpointError(f"adapter {folder.name} targets {target} but holds no weights for it")

    def _pattern(self, key: str, module: str, default: Any) -> Any:
        for pattern, value in (self.config.get(key) or {}).items():
            if module == pattern or re.match(rf"(.*\.)?{pattern}$", module):
                return value
        return default

    def check(self, ckpt: Checkpoint) -> None:
        """Refuse, before anything is written, an adapter that does not fit this base."""
        base_arch = (ckpt.config.get("architectures") or ["?"])[0]
        ours = (self.config.get("auto_mapping") or {}).get("base_model_class")
        if ours and ours != base_arch:
            raise CheckpointError(f"adapter {self.folder.name} was trained on a {ours}, the base is a {base_arch}")
        for module, pair in self.pairs.items():
            ref = ckpt.tensors.get(module + ".weight")
            if ref is None:
                raise CheckpointError(f"the base model has no module {module}, which adapter {self.folder.name} targets")
            if tuple(ref.shape) != pair.out_in:
                raise CheckpointError(
                    f"adapter {self.folder.name} does not fit the base: module {module} is {list(ref.shape)} in the "
                    f"base but {list(pair.out_in)} in the adapter (another architecture or hidden size?)"
                )
        for name, ref in self.replaced.items():
            base = ckpt.tensors.get(name)
            if base is None or tuple(base.shape) != ref.shape:
                raise CheckpointError(f"adapter {self.folder.name} replaces {name}, which the base lacks or shapes differently")

    def apply(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if hf_name in self.replaced:
            data = self.replaced[hf_name].numpy()
        pair = self.pairs.get(hf_name.removesuffix(".weight")) if hf_name.endswith(".weight") else None
        return data + pair.delta() if pair else data

    def close(self) -> None:
        self.file.close()


class Merge:
    """Several adapters applied in order, as the converter's per-tensor hook."""

    def __init__(self, folders: Sequence[Path]) -> None:
        self.adapters: list[Adapter] = []
        try:
            for folder in folders:
                self.adapters.append(Adapter(folder))
        except BaseException:
            self.close()
            raise

    def check(self, ckpt: Checkpoint) -> None:
        for adapter in self.adapters:
            adapter.check(ckpt)

    def __call__(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        for adapter in self.adapters:
            data = adapter.apply(hf_name, data)
        return data

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()


# ---- edgellm merge: the merged model as a HF safetensors checkpoint --------------------------

_OUT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _encode_like(data: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return gguf.quants.quantize(data.astype(np.float32, copy=False), gguf.GGMLQuantizationType.BF16).tobytes()
    if dtype in _OUT_DTYPES:
        return data.astype(_OUT_DTYPES[dtype], copy=False).tobytes()
    return data.tobytes()


def merge_checkpoint(base: Path, adapters: Sequence[Path], output: Path, *, progress: Progress | None = None,
                     cancel: threading.Event | None = None) -> ConvertResult:
    """Write base + adapters as a new HF checkpoint folder, shard by shard, tensor by tensor.

    Each tensor keeps the base's dtype and shard; files other than weights (config, tokenizer,
    index) are copied. The folder appears only when complete.
    """
    start = time.perf_counter()
    output = Path(output)
    if output.exists():
        raise UsageError(f"{output} already exists; merge writes a new folder")
    merge = Merge(adapters)
    try:
        with Checkpoint.open(Path(base)) as ckpt:
            if ckpt.quantization is not None:
                raise UsageError(
                    f"{ckpt.folder.name} is stored as {ckpt.quantization.label}: merge writes the base's own "
                    "tensors, and packed ones cannot take an adapter",
                    hint="`edgellm convert BASE --lora ADAPTER` merges into its dequantized weights",
                )
            arch = architecture_for(ckpt.config)
            merge.check(ckpt)
            total = sum(ref.nbytes for ref in ckpt.tensors.values())
            done = count = 0
            with atomic_dir(output) as tmp:
                for f in ckpt.folder.iterdir():
                    if f.is_file() and not f.name.endswith(".safetensors") and f.suffix not in PICKLE_SUFFIXES:
                        shutil.copy(f, tmp / f.name)
                for shard in ckpt.files:
                    refs = list(shard.tensors.values())
                    header, offset = {"__metadata__": {"format": "pt"}}, 0
                    for ref in refs:
                        header[ref.name] = {"dtype": ref.dtype, "shape": list(ref.shape),
                                            "data_offsets": [offset, offset + ref.nbytes]}
                        offset += ref.nbytes
                    raw = json.dumps(header, separators=(",", ":")).encode()
                    raw += b" " * (-len(raw) % 8)
                    with open(tmp / shard.path.name, "wb") as out:
                        out.write(len(raw).to_bytes(8, "little") + raw)
                        for ref in refs:
                            if cancel is not None and cancel.is_set():
                                raise Cancelled("merge cancelled; no folder was written")
                            data = merge(ref.name, ref.numpy())
                            out.write(_encode_like(data, ref.dtype))
                            done += ref.nbytes
                            count += 1
                            if progress is not None:
                                progress(count, len(ckpt.tensors), done, total, ref.name)
    finally:
        merge.close()
    size = sum(p.stat().st_size for p in output.iterdir())
    return ConvertResult(output, gguf.MODEL_ARCH_NAMES[arch.arch], "as base",
                         count, size, time.perf_counter() - start)


# ---- edgellm convert-lora: the adapter as a GGUF LoRA llama.cpp applies at load time ----------

LORA_OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16}


def convert_lora(adapter_dir: Path, base: Path, output: Path, outtype: str = "f16", *,
                 progress: Progress | None = None) -> ConvertResult:
    """Write the adapter's A and B matrices under llama.cpp's tensor names (``blk.N.attn_q.weight.lora_a``).

    llama.cpp scales each pair by alpha / rank, rank read from the tensors; any per-module alpha
    or rank pattern (or rsLoRA's sqrt) is folded into B so one alpha serves the whole file.
    """
    start = time.perf_counter()
    if outtype.lower() not in LORA_OUTTYPES:
        raise UsageError(f"unknown --outtype {outtype!r} for a LoRA", hint="f32 or f16")
    qtype = LORA_OUTTYPES[outtype.lower()]
    adapter = Adapter(adapter_dir)
    try:
        with Checkpoint.open(Path(base)) as ckpt:
            arch = architecture_for(ckpt.config)
            adapter.check(ckpt)
            if adapter.replaced:
                raise CheckpointError(
                    f"adapter {adapter.folder.name} replaces whole tensors ({next(iter(adapter.replaced))}), which a "
                    "GGUF LoRA cannot carry", hint="merge it instead: edgellm convert BASE --lora ADAPTER",
                )
            writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
            writer.add_name(adapter.folder.name)
            plan = []
            for module, pair in sorted(adapter.pairs.items()):
                if pair.transpose:
                    raise CheckpointError(
                        f"module {module} of adapter {adapter.folder.name} is an embedding or fan_in_fan_out LoRA, "
                        "which edgellm writes only merged", hint="edgellm convert BASE --lora ADAPTER",
                    )
                name = arch.gguf_name(module + ".weight")
                plan.append((name + ".lora_a", pair, "a"))
                plan.append((name + ".lora_b", pair, "b"))
            np_dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)

            def make(name: str, pair: LoraPair, part: str) -> np.ndarray:
                if part == "a":
                    return pair.a.numpy().astype(np_dtype)
                factor = pair.scale * pair.rank / adapter.alpha  # 1 unless patterns or rsLoRA
                return arch.transform(name.removesuffix(".lora_b"), pair.b.numpy() * np.float32(factor)).astype(np_dtype)

            jobs = []
            for name, pair, part in plan:
                shape = (pair.a if part == "a" else pair.b).shape
                nbytes = int(np.prod(shape)) * np_dtype.itemsize
                writer.add_tensor_info(name, shape, np_dtype, nbytes)
                jobs.append((name, nbytes, partial(make, name, pair, part)))
            write_streamed(writer, Path(output), jobs, progress)
    finally:
        adapter.close()
    return ConvertResult(Path(output), gguf.MODEL_ARCH_NAMES[arch.arch], qtype.name, len(plan),
                         Path(output).stat().st_size, time.perf_counter() - start)
