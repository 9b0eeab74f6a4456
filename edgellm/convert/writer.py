"""Write a GGUF whose tensors are made one at a time: what both converters (a checkpoint, a LoRA
adapter) share, so peak memory stays near one tensor and a file exists only once it is whole."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from edgellm.errors import Cancelled, CheckpointError
from edgellm.fsutil import atomic_path

#: (tensors done, tensors in all, bytes done, bytes in all, tensor name)
Progress = Callable[[int, int, int, int, str], None]


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    arch: str
    outtype: str
    n_tensors: int
    size: int
    seconds: float
    source: str | None = None  # the quantization a checkpoint was stored in, dequantized on the way


def check_finite(name: str, data: np.ndarray) -> None:
    """Refuse a tensor with NaN or infinite values (a damaged or hostile checkpoint, or one whose
    values overflow the output type): llama.cpp would load it and answer nonsense."""
    if not np.isfinite(data).all():
        bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise CheckpointError(f"{name} has {bad} values that are not finite numbers (NaN or infinite)",
                              hint="no file was written; the checkpoint is damaged, or too large for the output type")


def write_streamed(writer: gguf.GGUFWriter, output: Path,
                   tensors: Sequence[tuple[str, int, Callable[[], np.ndarray]]],
                   progress: Progress | None = None, cancel: threading.Event | None = None,
                   check: Callable[[Path], None] | None = None) -> None:
    """Write a GGUF whose tensor infos are all added, making each tensor's data only when its
    turn comes: one tensor in memory at a time, and no file at ``output`` unless all of it is
    (and ``check(path)``, given the whole file before it is renamed into place, passes)."""
    total, done = sum(nbytes for _, nbytes, _ in tensors), 0
    with atomic_path(output) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        try:
            for i, (name, nbytes, make) in enumerate(tensors):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("conversion cancelled; no file was written")
                data = make()
                if data.dtype.kind == "f":
                    check_finite(name, data)
                writer.write_tensor_data(data)
                done += nbytes
                if progress is not None:
                    progress(i + 1, len(tensors), done, total, name)
        finally:
            writer.close()
        if check is not None:
            check(tmp)
