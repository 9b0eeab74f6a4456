"""Quantize a GGUF with llama.cpp's own quantizer, into a file or a new store entry.

The types themselves (names, bits per weight, cost) are the table in ``gguf/quant_types.py``.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import Cancelled, QuantizeError, StorageError, UsageError
from edgellm.fsutil import atomic_path
from edgellm.gguf.ggml_types import GGML_TYPES
from edgellm.gguf.header import GGUFHeader, read_header
from edgellm.gguf.quant_types import QuantType, is_quant_suffix

if TYPE_CHECKING:
    from edgellm.imatrix import ImportanceMatrix
    from edgellm.runtime.native import QuantizeParams

FULL_PRECISION = {"F32", "F16", "BF16"}


@dataclass(frozen=True)
class QuantizeResult:
    source: Path
    output: Path
    qtype: QuantType
    size_before: int
    size_after: int
    seconds: float
    tensors: int
    #: (tensor, type wanted, type written) for each tensor whose rows the wanted type's blocks do
    #: not divide (576-wide rows and 256-weight K/IQ blocks), as llama.cpp's log reports them
    fallbacks: tuple[tuple[str, str, str], ...] = ()

    def fallback_summary(self) -> str:
        """``180 of 211 tensors fell back: q2_K -> q4_0 (150), q3_K -> q4_0 (30)``, or ``""``."""
        if not self.fallbacks:
            return ""
        pairs = Counter(f"{wanted} -> {used}" for _, wanted, used in self.fallbacks)
        counts = ", ".join(f"{pair} ({n})" for pair, n in pairs.most_common())
        return f"{len(self.fallbacks)} of {self.tensors} tensors fell back (rows not a multiple of the block): {counts}"


def ggml_type_id(name: str) -> int:
    """A tensor type for --output-tensor-type/--token-embedding-type (q8_0, q6_k, f16 ...)."""
    ids = {type_name: type_id for type_id, (type_name, _, _) in GGML_TYPES.items()}
    try:
        return ids[name.strip().upper()]
    except KeyError:
        raise UsageError(f"unknown tensor type {name!r}", hint="for example q8_0, q6_k, q4_k, f16") from None


def is_quantized(header: GGUFHeader) -> bool:
    """Whether the weights (the 2-D tensors) are already below 16 bits."""
    return any(t.type_name not in FULL_PRECISION for t in header.tensors if len(t.shape) >= 2)


def base_name(name: str) -> str:
    """``smollm2.q4_1`` or ``smollm2-f16`` -> ``smollm2``: the quantization is named anew."""
    match = re.match(r"^(.+)[.-]([^.-]+)$", name)
    return match.group(1) if match and is_quant_suffix(match.group(2)) else name


def quantized_name(model_name: str, qtype: QuantType, imatrix: bool = False) -> str:
    """The store name a quantization gets: ``smollm2-f16`` + Q4_K_M -> ``smollm2-q4_k_m``, and
    ``smollm2-q4_k_m-imat`` when an importance matrix guided it (both can live side by side)."""
    return f"{base_name(model_name.lower())}-{qtype.name.lower()}" + ("-imat" if imatrix else "")


def quantization_source(model_name: str, qtype: QuantType, imatrix: ImportanceMatrix | None = None) -> str:
    """What a store entry records as its origin: the model, the type, and the imatrix file if any
    (a matrix never saved is recorded as such)."""
    source = f"quantize:{model_name}:{qtype.name}"
    if imatrix is None:
        return source
    return f"{source}+imatrix:{Path(imatrix.path).resolve() if imatrix.path else 'unsaved'}"


def quantize_to_store(store, model_name: str, header: GGUFHeader, qtype: QuantType, name: str | None = None,
                      source: str | None = None, **options) -> tuple[QuantizeResult, object]:
    """Quantize into a new store entry, ``<model>-<type>[-imat]`` unless ``name``; options as
    quantize(). ``source`` records where the model came from (default: the model quantized)."""
    done: list[QuantizeResult] = []
    imatrix = options.get("imatrix")
    entry = store.create(
        name or quantized_name(model_name, qtype, imatrix is not None),
        f"{base_name(header.path.stem)}-{qtype.name}.gguf",
        source or quantization_source(model_name, qtype, imatrix),
        lambda dest: done.append(quantize(header, qtype, dest, **options)),
        expected_size=estimated_size(header, qtype),
    )
    return done[0], entry


def planned_size(header: GGUFHeader, qtype: QuantType, **options) -> int:
    """The size of the file quantize() would write, from llama.cpp's quantizer itself in its dry run
    (no weight read): every tensor's type as the real run picks it, fallbacks from rows the
    type's blocks do not divide included, plus the header as the output copies it. Within a few
    KiB of the real file; ``options`` as quantize() takes them."""
    from edgellm.runtime.native import quantize_model
    from edgellm.system import llamalog

    params = _native_params(qtype, 1, True, options.get("leave_output_tensor", False), options.get("pure", False),
                            options.get("output_tensor_type"), options.get("token_embedding_type"), None,
                            options.get("tensor_types", ()))
    sizes: list[float] = []
    position = llamalog.mark()
    with llamalog.listen(lambda line: sizes.extend(float(m.group(1)) for m in [_QUANT_SIZE.search(line)] if m)):
        status = quantize_model(header.path, None, params)
    if status != 0 or not sizes:
        cause = llamalog.last_error(position) or "see EDGELLM_LLAMA_LOG=1"
        raise QuantizeError(f"llama.cpp could not size {header.path.name} as {qtype.name}: {cause}")
    return int(sizes[-1] * 2**20) + header.data_offset


def estimated_size(header: GGUFHeader, qtype: QuantType) -> int:
    """A generous estimate of the output's size, for the disk-space check."""
    return int(header.parameter_count * qtype.bpw / 8 * 1.1) + (16 << 20)


def require_imatrix(qtype: QuantType, has_imatrix: bool) -> None:
    """Refuse a type llama.cpp can only write with an importance matrix, saying how to make one."""
    if qtype.needs_imatrix and not has_imatrix:
        raise UsageError(
            f"{qtype.name} needs an importance matrix: without one its 1-3 bit weights lose too much",
            hint="pass --calibration to make one from edgellm's calibration text (or --calibration FILE), or "
                 "make one with `edgellm imatrix MODEL -o FILE` and pass --imatrix FILE",
        )


def refuse_requantize(header: GGUFHeader, allow_requantize: bool = False) -> None:
    """Quantizing quantized weights again loses quality twice: refused unless asked for."""
    if is_quantized(header) and not allow_requantize:
        raise UsageError(
            f"{header.path.name} is already quantized ({header.quantization}); quantizing it again loses more "
            "quality", hint="start from an F16/BF16/F32 model, or pass --allow-requantize",
            app_hint="start from an F16 or BF16 model",
        )


def source_note(header: GGUFHeader, qtype: QuantType) -> str | None:
    """Advice for a model converted from a checkpoint stored quantized (GPTQ, AWQ, bitsandbytes,
    FP8): a type of more bits than the source kept costs size and gains nothing, since the
    weights were already rounded to the source's grid."""
    from edgellm.convert.quantized import SOURCE_BITS, SOURCE_QUANTIZATION

    label, bits = header.metadata.get(SOURCE_QUANTIZATION), header.metadata.get(SOURCE_BITS)
    if not isinstance(label, str) or not isinstance(bits, (int, float)) or qtype.bpw <= bits + 0.5:
        return None
    return (f"note: {header.path.name} was dequantized from {label} (about {bits:.1f} bits per weight); "
            f"{qtype.name}'s {qtype.bpw:.1f} bits gain nothing over it, only size")


def check_request(header: GGUFHeader, qtype: QuantType, output: Path, allow_requantize: bool,
                  imatrix: ImportanceMatrix | None = None) -> None:
    """Every refusal that can be decided before llama.cpp starts writing."""
    src = header.path
    if output.exists() and output.resolve() == src.resolve():
        raise UsageError(f"the output {output} is the input itself", hint="choose another -o path")
    require_imatrix(qtype, imatrix is not None)
    if imatrix is not None:
        check_coverage(header, imatrix)
    refuse_requantize(header, allow_requantize)
    needed = estimated_size(header, qtype)
    folder = output.parent if output.parent.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StorageError(
            f"not enough disk space in {folder}: about {needed >> 20} MiB needed, {free >> 20} MiB free"
        )


def check_coverage(header: GGUFHeader, imatrix: ImportanceMatrix) -> None:
    """An importance matrix made for this model covers its layers' weight matrices, each as wide as
    the weight's rows; one that covers fewer than half of them was made for another model (or is
    damaged), and one with another width would be refused by llama.cpp halfway through."""
    from edgellm.errors import ImatrixError

    weights = {t.name: t for t in header.tensors if t.name.startswith("blk.") and t.name.endswith(".weight")
               and len(t.shape) >= 2}
    covered = [name for name in imatrix.sums if name in weights]
    if len(covered) * 2 < len(weights):
        raise ImatrixError(f"the importance matrix covers {len(covered)} of the {len(weights)} layer weights of "
                           f"{header.path.name}: it was made for another model",
                           hint="make one for this model with `edgellm imatrix MODEL`")
    for name in covered:
        if imatrix.sums[name].shape[1] != weights[name].shape[0]:
            raise ImatrixError(f"the importance matrix has {imatrix.sums[name].shape[1]} columns for {name}, "
                               f"which has rows of {weights[name].shape[0]}: it was made for another model")


def parse_tensor_type(text: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` as llama-quantize's --tensor-type takes it (``attn_v=q8_0``,
    ``blk\\.1[0-9]\\.ffn_down=q6_k``): the pattern lower-cased, searched in each tensor's name."""
    pattern, sep, type_name = text.partition("=")
    if not sep or not pattern or not type_name:
        raise UsageError(f"--tensor-type {text!r} is not PATTERN=TYPE", hint="for example attn_v=q8_0")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--tensor-type {text!r}: the pattern is not a regular expression ({exc})") from None
    ggml_type_id(type_name)
    return pattern.lower(), type_name


def _native_params(qtype: QuantType, threads: int, allow_requantize: bool, leave_output_tensor: bool, pure: bool,
                   output_tensor_type: str | None, token_embedding_type: str | None,
                   imatrix: ImportanceMatrix | None, tensor_types: Sequence[tuple[str, str]]) -> QuantizeParams:
    """llama.cpp's quantize parameters for these options. With an importance matrix, each weight's
    mean squared activations and the keys llama-quantize records with them (file, dataset,
    entries, chunks), so the output is byte for byte llama-quantize's."""
    from edgellm.runtime.native import QuantizeParams

    rows, keys = None, []
    if imatrix is not None:
        rows = imatrix.normalized()
        keys = [("quantize.imatrix.file", str(imatrix.path))] if imatrix.path else []
        if imatrix.datasets:
            keys.append(("quantize.imatrix.dataset", imatrix.datasets[0]))
        keys.append(("quantize.imatrix.entries_count", len(rows)))
        if imatrix.chunk_count > 0:
            keys.append(("quantize.imatrix.chunks_count", imatrix.chunk_count))
    return QuantizeParams(
        qtype.ftype, threads, allow_requantize, not leave_output_tensor, pure,
        ggml_type_id(output_tensor_type) if output_tensor_type else None,
        ggml_type_id(token_embedding_type) if token_embedding_type else None,
        rows, keys, [(pattern, ggml_type_id(type_name)) for pattern, type_name in tensor_types],
    )


def quantize(
    header: GGUFHeader,
    qtype: QuantType,
    output: Path,
    *,
    threads: int | None = None,
    allow_requantize: bool = False,
    leave_output_tensor: bool = False,
    pure: bool = False,
    output_tensor_type: str | None = None,
    token_embedding_type: str | None = None,
    imatrix: ImportanceMatrix | None = None,
    tensor_types: Sequence[tuple[str, str]] = (),
    on_tensor: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> QuantizeResult:
    """Write ``header.path`` quantized to ``qtype`` at ``output`` with llama.cpp's own quantizer.

    ``imatrix`` is an importance matrix (load_imatrix reads edgellm's or llama-imatrix's files)
    the quantizer weighs each weight's columns by; ``tensor_types`` are (pattern, type) pairs from
    parse_tensor_type. The file appears at ``output`` only when complete and valid. llama.cpp's
    quantizer cannot be interrupted, so it runs in a daemon thread: Ctrl-C in the caller's thread
    removes the temporary file at once, and the thread's remaining writes go to a file nobody can see.
    ``on_tensor(index, total, name)`` follows progress from llama.cpp's per-tensor log lines;
    setting ``cancel`` stops the same way Ctrl-C does.
    """
    from edgellm.system import llamalog
    from edgellm.system.hardware import physical_cores

    output = Path(output)
    check_request(header, qtype, output, allow_requantize, imatrix)
    from edgellm.runtime.native import quantize_model

    params = _native_params(qtype, threads or physical_cores(), allow_requantize, leave_output_tensor, pure,
                            output_tensor_type, token_embedding_type, imatrix, tensor_types)

    fallbacks: list[tuple[str, str, str]] = []

    def follow(line: str) -> None:
        match = _TENSOR_LINE.match(line)
        if match and on_tensor:
            on_tensor(int(match.group(1)), int(match.group(2)), match.group(3))
        if fallback := _FALLBACK_LINE.search(line):
            fallbacks.append(fallback.groups())

    start = time.perf_counter()
    position = llamalog.mark()
    with atomic_path(output) as tmp, llamalog.listen(follow):
        status: list[int] = []
        finished = threading.Event()

        def work() -> None:
            try:
                status.append(quantize_model(header.path, tmp, params))
            finally:
                finished.set()

        threading.Thread(target=work, name="llama-quantize", daemon=True).start()
        while not finished.wait(0.1):  # short waits keep Ctrl-C deliverable to this thread
            if cancel is not None and cancel.is_set():
                raise Cancelled("quantization cancelled; no file was written")
        if status != [0]:
            cause = llamalog.last_error(position) or "see EDGELLM_LLAMA_LOG=1"
            raise QuantizeError(f"llama.cpp could not quantize {header.path.name}: {cause}")
        written = read_header(tmp)
    return QuantizeResult(header.path, output, qtype, header.file_size, written.file_size,
                          time.perf_counter() - start, len(written.tensors), tuple(fallbacks))


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_QUANT_SIZE = re.compile(r"quant size\s*=\s*([0-9.]+) MiB")
_FALLBACK_LINE = re.compile(r"(\S+)\s+- ncols\s+\d+ not divisible by \d+ \(required for type\s+(\S+)\)"
                            r".*-> falling back to\s+(\S+)")
