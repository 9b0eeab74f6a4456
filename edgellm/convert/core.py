"""convert(): a Hugging Face checkpoint folder in, one GGUF out, one tensor at a time.

The whole file is laid out (header, metadata, tokenizer, every tensor's name, shape and type)
before a single weight is read, and every check that can fail does so then: a refusal costs
nothing and leaves nothing. Weights then stream from the safetensors mmap through the
architecture's transform (and any LoRA merge) into the writer, so peak memory stays near one
output tensor (a layer's experts stacked into one, for a mixture-of-experts model). The output
is written to a temporary file and renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edgellm.convert.archs import Architecture, Mapped, architecture_for
from edgellm.convert.checkpoint import Checkpoint, TensorRef, reading
from edgellm.convert.lora import Merge
from edgellm.convert.quantized import SOURCE_BITS, SOURCE_QUANTIZATION, logical_shapes
from edgellm.convert.vocab import read_vocab
from edgellm.convert.writer import ConvertResult, Progress, check_finite, write_streamed
from edgellm.errors import CheckpointError, UsageError
from edgellm.gguf.header import ArrayValue, GGUFHeader, TensorInfo
from edgellm.gguf.quant_types import main_ggml_type, quant_type

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, Q | None] = {"auto": None, "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}

@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the output: where it comes from, and how it is stored."""

    name: str
    shape: tuple[int, ...]
    qtype: Q
    sources: tuple[TensorRef, ...]  # none: made from the config (Architecture.extras)
    combine: Callable[..., np.ndarray] | None = None  # several sources into one (Mapped.combine)
    make: Callable[[], np.ndarray] | None = None
    raw: bool = False  # combine gives the stored bytes (a type the checkpoint shipped, kept)

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))

    def writer_info(self) -> tuple[tuple[int, ...], np.dtype]:
        """The shape and dtype GGUFWriter wants: native for f32/f16, raw bytes for block types."""
        if self.qtype in (Q.F32, Q.F16):
            return self.shape, np.dtype(np.float32 if self.qtype == Q.F32 else np.float16)
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype), np.dtype(np.uint8)


def outtype_for(name: str, ckpt: Checkpoint) -> Q:
    key = name.lower()
    if key not in OUTTYPES:
        raise UsageError(f"unknown --outtype {name!r}", hint="choose one of " + ", ".join(OUTTYPES))
    if OUTTYPES[key] is not None:
        return OUTTYPES[key]
    dtypes = {ref.dtype for ref in ckpt.tensors.values() if len(ref.shape) > 1}
    return Q.BF16 if dtypes == {"BF16"} else Q.F16


def _tensor_type(name: str, shape: tuple[int, ...], wanted: Q) -> Q:
    """Norms, biases (an expert layer's are 2-D) and other 1-D tensors stay f32 as llama.cpp expects,
    and so do the experts' routers (as convert_hf_to_gguf.py and llama-quantize keep them); q8_0
    needs rows of 32."""
    if len(shape) == 1 or name.endswith(("_norm.weight", ".bias")) or ".ffn_gate_inp" in name or wanted == Q.F32:
        return Q.F32
    if wanted == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return wanted


def _order(name: str) -> tuple:
    """token_embd first, then blocks in number order, then the output: as llama.cpp's files read."""
    match = re.match(r"blk\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def mapped_tensors(arch: Architecture, shapes: dict[str, tuple[int, ...]]) -> list[Mapped]:
    """The architecture's output tensors, each checked against the shape the config implies, and
    no two inputs mapped to one name."""
    seen: dict[str, Mapped] = {}
    for mapped in arch.map_tensors(shapes):
        source = mapped.sources[0] if len(mapped.sources) == 1 else f"{mapped.sources[0]} ..."
        if mapped.name in seen:
            raise CheckpointError(f"tensors {seen[mapped.name].sources[0]!r} and {source!r} both map to {mapped.name}")
        expected = arch.expected_shape(mapped.name)
        shape = mapped.shape
        if expected is not None and (
            len(expected) != len(shape) or any(e is not None and e != s for e, s in zip(expected, shape))
        ):
            shown = [e if e is not None else "*" for e in expected]
            made = "has" if len(mapped.sources) == 1 else f"and the rest make {mapped.name} of"
            raise CheckpointError(f"tensor {source!r} {made} shape {list(shape)} but the config implies {shown}")
        seen[mapped.name] = mapped
    return list(seen.values())


def plan_tensors(arch: Architecture, ckpt: Checkpoint, wanted: Q, keep_quantized: bool = True) -> list[PlannedTensor]:
    """Every output tensor; one the checkpoint ships in a llama.cpp type stays in it unless
    ``keep_quantized`` is off (an explicit --outtype), when it is dequantized to ``wanted``."""
    planned: dict[str, PlannedTensor] = {}
    for m in mapped_tensors(arch, {name: ref.shape for name, ref in ckpt.tensors.items()}):
        sources = tuple(ckpt.tensors[s] for s in m.sources)
        if m.quantized is not None and keep_quantized:
            planned[m.name] = PlannedTensor(m.name, m.shape, m.quantized, sources, m.combine, raw=True)
        else:
            planned[m.name] = PlannedTensor(m.name, m.shape, _tensor_type(m.name, m.shape, wanted), sources,
                                            m.dequantize or m.combine)
    missing = sorted(arch.required() - planned.keys(), key=_order)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"the checkpoint lacks tensor {missing[0]}{more}", hint="is the download complete?")
    for extra in arch.extras():
        planned[extra.name] = PlannedTensor(extra.name, extra.shape, Q.F32, (), make=extra.make)
    return sorted(planned.values(), key=lambda t: _order(t.name))


def _metadata(writer: gguf.GGUFWriter, ckpt: Checkpoint, name: str | None, n_params: int,
              source_repo: str | None, arch: Architecture, vocab_model: str) -> None:
    meta = gguf.Metadata.load(None, ckpt.folder, name or ckpt.config.get("_name_or_path") or ckpt.folder.name,
                              n_params)
    meta.name = arch.model_name(meta.name, vocab_model) if meta.name else meta.name
    if meta.size_label is None:
        meta.size_label = gguf.size_label(n_params, 0, 0, 0)
    if source_repo:
        meta.source_repo_url = f"https://huggingface.co/{source_repo}"
    meta.set_gguf_meta_model(writer)


def convert(
    source: Path,
    output: Path,
    outtype: str = "auto",
    *,
    name: str | None = None,
    source_repo: str | None = None,
    lora: Sequence[Path] = (),
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> ConvertResult:
    """Convert the checkpoint folder ``source`` into the GGUF file ``output``.

    ``lora`` adapter folders are merged into the weights on the way (see lora.py); ``cancel``
    stops between tensors, leaving no file.
    """
    start = time.perf_counter()
    output = Path(output)
    if output.exists() and output.is_dir():
        raise UsageError(f"{output} is a folder; give a .gguf file name")
    with Checkpoint.open(Path(source)) as ckpt, contextlib.closing(Merge(lora)) as merge, reading(ckpt.folder.name):
        arch = architecture_for(ckpt.config)
        qtype = outtype_for(outtype, ckpt)
        tensors = plan_tensors(arch, ckpt, qtype, keep_quantized=outtype.lower() == "auto")
        merge.check(ckpt)
        if lora and any(t.raw for t in tensors):
            raise UsageError("LoRA adapters cannot be merged into experts kept in MXFP4",
                             hint="convert with --outtype bf16 (or f16) to dequantize them first")
        embd = next(t for t in tensors if t.name == "token_embd.weight")
        n_vocab = embd.shape[0]
        if ckpt.config.get("vocab_size") and int(ckpt.config["vocab_size"]) != n_vocab:
            raise CheckpointError(
                f"config.json says vocab_size {ckpt.config['vocab_size']} but the embedding "
                f"{embd.sources[0].name!r} has {n_vocab} rows"
            )
        vocab = read_vocab(ckpt.folder, n_vocab)

        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
        n_params = sum(int(np.prod(t.shape)) for t in tensors)
        _metadata(writer, ckpt, name, n_params, source_repo, arch, vocab.model)
        arch.hyperparameters(writer)
        writer.add_file_type(FILE_TYPES[qtype])
        if qtype == Q.Q8_0:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer, ckpt.folder)
        if ckpt.quantization is not None:
            writer.add_string(SOURCE_QUANTIZATION, ckpt.quantization.label)
            writer.add_float32(SOURCE_BITS, ckpt.quantization.bits)
        for t in tensors:
            writer.add_tensor_info(t.name, *t.writer_info(), t.nbytes, raw_dtype=t.qtype)


        def make(t: PlannedTensor) -> np.ndarray:
            if t.make is not None:
                return _encode(t.name, t.make(), t.qtype)
            if t.raw:
                return t.combine([ref.numpy() for ref in t.sources])
            parts = [merge(ref.name, ref.numpy()) for ref in t.sources]
            data = t.combine(parts) if t.combine else parts[0]
            return _encode(t.name, arch.transform(t.name, data), t.qtype)

        write_streamed(writer, output, [(t.name, t.nbytes, partial(make, t)) for t in tensors], progress, cancel,
                       check=_llama_cpp_loads)
        size = output.stat().st_size
    return ConvertResult(output, gguf.MODEL_ARCH_NAMES[arch.arch], qtype.name, len(tensors), size,
                         time.perf_counter() - start, ckpt.quantization.label if ckpt.quantization else None)


def _llama_cpp_loads(path: Path) -> None:
    """A GGUF llama.cpp cannot load (its vocabulary, a tensor's shape) is refused, never kept."""
    from edgellm.errors import LoadError
    from edgellm.runtime.native import check_loadable

    try:
        check_loadable(path)
    except LoadError as exc:
        raise CheckpointError(f"llama.cpp cannot load what this checkpoint converts to: {exc.message}",
                              hint="no file was written; please report the checkpoint to edgellm") from None


def _encode(name: str, data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32, copy=False)
    if qtype == Q.F16:
        return data.astype(np.float16)
    check_finite(name, data)  # a block type's bytes cannot be checked once written
    return gguf.quants.quantize(data.astype(np.float32, copy=False), qtype)


def default_name(source: Path, outtype: str, lora: Sequence[Path] = ()) -> str:
    """``SmolLM2-135M-Instruct`` + f16 -> ``smollm2-135m-instruct-f16``: a valid store name;
    merged adapters add their folder names."""
    parts = [Path(os.path.abspath(p)).name for p in (source, *lora)]
    stem = re.sub(r"[^a-z0-9._-]+", "-", "-".join(parts).lower()).strip("-.") or "model"
    return f"{stem}-{outtype.lower()}"


@contextlib.contextmanager
def temporary_gguf(source: Path, folder: Path, file_name: str, outtype: str = "auto",
                   **options) -> Iterator[ConvertResult]:
    """Convert to a GGUF in a temporary folder inside ``folder`` (the store's, so a later rename or
    link stays on one disk), gone when the block ends: for a conversion only made to be quantized."""
    from edgellm.fsutil import tmp_prefix

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=tmp_prefix("convert-"), dir=folder) as tmp:
        yield convert(source, Path(tmp) / file_name, outtype, **options)


def planned_header(config: dict, tensors: dict[str, tuple[int, ...]], target: str = "F16") -> GGUFHeader:
    """The header of the GGUF this checkpoint converts to at ``target`` (F16, BF16, Q4_K_M, ...),
    from its config and tensor shapes alone: no weight read, nothing written. The hyperparameters
    are the ones conversion writes; weights are sized at the type's bits per weight (1-D tensors
    stay f32), laid out in checkpoint order, so offsets are approximate. What ``pull --plan``
    plans with, exactly as with a GGUF already on disk."""
    with reading("the checkpoint"):
        tensors = logical_shapes(config, tensors)
        arch = architecture_for(config)
        qtype = quant_type(target)
        writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
        arch.hyperparameters(writer)
    metadata: dict[str, Any] = {key: value.value for key, value in writer.kv_data[0].items()}
    type_id, type_name = main_ggml_type(qtype)
    infos, offset = [], 0
    for mapped in arch.map_tensors(tensors):
        name, hf_shape = mapped.name, mapped.shape
        n = int(np.prod(hf_shape))
        flat = len(hf_shape) == 1
        nbytes = n * 4 if flat else int(n * qtype.bpw / 8)
        infos.append(TensorInfo(name, tuple(reversed(hf_shape)), 0 if flat else type_id, "F32" if flat else type_name,
                                offset, nbytes))
        offset += nbytes
    embd = next((i for i in infos if i.name == "token_embd.weight"), None)
    n_vocab = embd.shape[-1] if embd else int(config.get("vocab_size") or 0)
    metadata["tokenizer.ggml.tokens"] = ArrayValue(8, n_vocab)  # GGUF_TYPE_STRING; the count is what sizes
    return GGUFHeader(Path(f"{metadata['general.architecture']}.gguf"), offset, 3, 32, 0, metadata, tuple(infos))
