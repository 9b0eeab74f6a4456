"""Read a Hugging Face checkpoint folder without trusting it: config, safetensors shards, by mmap.

Only safetensors are read (a header of JSON plus raw bytes); pickle formats can run code when
loaded and are refused. Every tensor's offsets are checked against its file's size before any
byte is touched, so a truncated download fails naming the tensor instead of crashing later.
Tensors are read one at a time and their pages dropped afterwards, so peak memory stays near
the largest tensor whatever the checkpoint's size.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.convert.quantized import dequantized_view
from edgellm.errors import CheckpointError, UsageError, brief

#: safetensors dtype -> (numpy dtype of the stored bytes, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # numpy has no bfloat16: read the bits, widen to float32 ourselves
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
    "F8_E4M3": ("u1", 1),  # FP8 codes, read as bytes and decoded by the quantized checkpoint's scheme
    "F8_E5M2": ("u1", 1),
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
MAX_HEADER = 100 << 20
CHUNK = 16 << 20  # bytes of a tensor widened at a time


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie, checked against the file's size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: SafetensorsFile
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def numpy(self) -> np.ndarray:
        """A float32 copy (or the integer values) of the tensor; its file pages are released."""
        return self.file.read(self)


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb")
            size = os.fstat(self._fh.fileno()).st_size
            head = self._fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path.name} is truncated: too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise CheckpointError(f"{path.name} is truncated or not safetensors: header of {n} bytes")
            header = json.loads(self._fh.read(n))
        except RecursionError:
            raise CheckpointError(f"{path.name} is not a safetensors file: its header is nested too deeply") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
        except (ValueError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} is not a safetensors file: its header is not JSON") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path.name} is not a safetensors file: its header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors = {name: self._check(name, entry, size) for name, entry in header.items()}
        previous = None  # tensors may not share bytes: one would be read as another's data
        for ref in sorted(self.tensors.values(), key=lambda r: (r.begin, r.end)):
            if previous is not None and ref.begin < previous.end and ref.end > ref.begin:
                raise CheckpointError(f"tensors {previous.name!r} and {ref.name!r} in {path.name} overlap")
            previous = ref if ref.end > ref.begin else previous
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def _check(self, name: str, entry: Any, size: int) -> TensorRef:
        where = f"tensor {name!r} in {self.path.name}"
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{where} has a malformed entry") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{where} has dtype {dtype}, which edgellm does not read")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
            isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        ):
            raise CheckpointError(f"{where} has a malformed shape or offsets")
        if end - begin != prod(shape) * DTYPES[dtype][1]:
            raise CheckpointError(f"{where}: {end - begin} bytes do not hold shape {list(shape)} of {dtype}")
        if self.data_start + end > size:
            raise CheckpointError(
                f"{self.path.name} is truncated: {where} ends at byte {self.data_start + end:,} "
                f"but the file has {size:,}",
                hint="download it again",
            )
        return TensorRef(name, dtype, shape, self, self.data_start + begin, self.data_start + end)

    def read(self, ref: TensorRef) -> np.ndarray:
        np_dtype, itemsize = DTYPES[ref.dtype]
        count = prod(ref.shape)
        out = np.empty(count, np.float32 if np.dtype(np_dtype).kind == "f" or ref.dtype == "BF16" else np_dtype)
        # widen a slice at a time and drop its file pages at once: the mapped bytes never pile up
        step = max(1, CHUNK // itemsize)
        for first in range(0, count, step):
            n = min(step, count - first)
            begin = ref.begin + first * itemsize
            raw = np.frombuffer(self._map, dtype=np_dtype, count=n, offset=begin)
            out[first : first + n] = (raw.astype(np.uint32) << 16).view(np.float32) if ref.dtype == "BF16" else raw
            del raw
            self._release(begin, begin + n * itemsize)
        return out.reshape(ref.shape)

    def _release(self, begin: int, end: int) -> None:
        """Drop these bytes' pages from this process's memory; the file stays mapped."""
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = begin - begin % mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._fh.close()


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Around the code that reads a checkpoint's config, tokenizer and tensor tables: a value of
    the wrong kind anywhere in them (a string layer count, malformed merges) is a one-line refusal
    naming the checkpoint (``what``), not a traceback."""
    try:
        yield
    except RecursionError:
        raise CheckpointError(f"{what}: a file of the checkpoint is nested too deeply") from None
    except (struct.error, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        raise CheckpointError(f"{what}: malformed checkpoint ({type(exc).__name__}: {brief(str(exc), 160)})") from None


def check_links(folder: Path) -> None:
    """Refuse a folder any of whose files leads outside it: a ``chat_template.jinja`` that links to
    /etc/shadow would otherwise be copied into the GGUF. Links inside the folder are fine, and so
    are a Hugging Face cache snapshot's links into its own repository's blobs."""
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # .../models--org--name/snapshots/<revision>/
        allowed.append(root.parent.parent / "blobs")
    try:
        entries = list(folder.rglob("*"))
    except OSError as exc:
        raise CheckpointError(f"cannot list {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if not entry.is_symlink():
            continue
        try:
            target = entry.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CheckpointError(f"{entry.relative_to(folder)} in {folder.name} is a broken or looping link") from None
        if not any(target.is_relative_to(place) for place in allowed):
            raise CheckpointError(
                f"{entry.relative_to(folder)} in {folder.name} links outside the checkpoint folder, to {target}",
                hint="copy the file into the folder if you mean to use it",
            )


def weight_files(folder: Path) -> list[Path]:
    """A checkpoint's safetensors files (its index's shards, each inside the folder); pickles refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index") from None
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                raise CheckpointError(f"{index.name} names a shard outside the folder: {name!r}")
            if not (folder / name).is_file():
                raise CheckpointError(f"shard {name} listed in {index.name} is missing", hint="download it again")
            files.append(folder / name)
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which edgellm refuses: "
            "loading a pickle can run arbitrary code",
            hint="convert them to safetensors with a tool you trust, or pull the repo's safetensors",
        )
    raise CheckpointError(f"{folder} has no safetensors weights")


class Checkpoint:
    """A Hugging Face model folder: its config and every tensor of its safetensors shards. A
    checkpoint stored quantized (``quantization``: what it was) lists the weights its packed
    layers stand for, dequantized when read (quantized.py)."""

    def __init__(self, folder: Path, config: dict[str, Any], files: list[SafetensorsFile]) -> None:
        self.folder = folder
        self.config = config
        self.files = files
        self.tensors: dict[str, TensorRef] = {}
        for f in files:
            for name, ref in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is in both {self.tensors[name].file.path.name} and {f.path.name}")
                self.tensors[name] = ref
        with reading(folder.name):
            self.tensors, self.quantization = dequantized_view(config, self.tensors)

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder holding a Hugging Face checkpoint")
        check_links(folder)
        return cls(folder, read_config(folder), [SafetensorsFile(p) for p in weight_files(folder)])

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json: not a Hugging Face checkpoint") from None
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: nested too deeply") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return language_config(config)


def language_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal checkpoints keep the language model's settings in ``text_config``."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config
