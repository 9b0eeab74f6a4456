"""Quantize a GGUF with llama.cpp's own quantizer, into a file or a new store entry.

The types themselves (names, bits per weight, cost) are the table in ``gguf/quant_types.py``.
"""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import Cancelled, QuantizeError, StorageError, UsageError
from edgellm.fsutil import atomic_path
from edgellm.gguf.ggml_types import GGML_TYPES
from edgellm.gguf.header import GGUFHeader, read_header
from edgellm.gguf.quant_types import QuantType, is_quant_suffix

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


def quantized_name(model_name: str, qtype: QuantType) -> str:
    """The store name a quantization gets: ``smollm2-f16`` + Q4_K_M -> ``smollm2-q4_k_m``."""
    return f"{base_name(model_name.lower())}-{qtype.name.lower()}"


def quantize_to_store(store, model_name: str, header: GGUFHeader, qtype: QuantType, name: str | None = None,
                      source: str | None = None, **options) -> tuple[QuantizeResult, object]:
    """Quantize into a new store entry, ``<model>-<type>`` unless ``name``; options as quantize().
    ``source`` records where the model came from (default: the model quantized)."""
    done: list[QuantizeResult] = []
    entry = store.create(
        name or quantized_name(model_name, qtype),
        f"{base_name(header.path.stem)}-{qtype.name}.gguf",
        source or f"quantize:{model_name}:{qtype.name}",
        lambda dest: done.append(quantize(header, qtype, dest, **options)),
        expected_size=estimated_size(header, qtype),
    )
    return done[0], entry


def estimated_size(header: GGUFHeader, qtype: QuantType) -> int:
    """A generous estimate of the output's size, for the disk-space check."""
    return int(header.parameter_count * qtype.bpw / 8 * 1.1) + (16 << 20)


def check_request(header: GGUFHeader, qtype: QuantType, output: Path, allow_requantize: bool) -> None:
    """Every refusal that can be decided before llama.cpp starts writing."""
    src = header.path
    if output.exists() and output.resolve() == src.resolve():
        raise UsageError(f"the output {output} is the input itself", hint="choose another -o path")
    if is_quantized(header) and not allow_requantize:
        raise UsageError(
            f"{src.name} is already quantized ({header.quantization}); quantizing it again loses more quality",
            hint="start from an F16/BF16/F32 model, or pass --allow-requantize",
        )
    needed = estimated_size(header, qtype)
    folder = output.parent if output.parent.exists() else Path.cwd()
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StorageError(
            f"not enough disk space in {folder}: about {needed >> 20} MiB needed, {free >> 20} MiB free"
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
    on_tensor: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
) -> QuantizeResult:
    """Write ``header.path`` quantized to ``qtype`` at ``output`` with llama.cpp's own quantizer.

    The file appears at ``output`` only when complete and valid. llama.cpp's quantizer cannot be
    interrupted, so it runs in a daemon thread: Ctrl-C in the caller's thread removes the
    temporary file at once, and the thread's remaining writes go to a file nobody can see.
    ``on_tensor(index, total, name)`` follows progress from llama.cpp's per-tensor log lines;
    setting ``cancel`` stops the same way Ctrl-C does.
    """
    from edgellm.system import llamalog
    from edgellm.system.hardware import physical_cores

    output = Path(output)
    check_request(header, qtype, output, allow_requantize)
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or physical_cores()
    params.ftype = qtype.ftype
    params.allow_requantize = allow_requantize
    params.quantize_output_tensor = not leave_output_tensor
    params.pure = pure
    if output_tensor_type:
        params.output_tensor_type = ggml_type_id(output_tensor_type)
    if token_embedding_type:
        params.token_embedding_type = ggml_type_id(token_embedding_type)

    def follow(line: str) -> None:
        match = _TENSOR_LINE.match(line)
        if match and on_tensor:
            on_tensor(int(match.group(1)), int(match.group(2)), match.group(3))

    start = time.perf_counter()
    position = llamalog.mark()
    with atomic_path(output) as tmp, llamalog.listen(follow):
        status: list[int] = []
        finished = threading.Event()

        def work() -> None:
            try:
                status.append(llama_cpp.llama_model_quantize(str(header.path).encode(), str(tmp).encode(), params))
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
    return QuantizeResult(
        header.path, output, qtype, header.file_size, written.file_size, time.perf_counter() - start, len(written.tensors)
    )


_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
