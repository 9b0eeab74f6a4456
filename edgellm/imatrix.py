"""Importance matrices: how much each input column of each weight matrix matters, measured on text.

For every matrix multiplication by a model weight, the sum over tokens of each input activation
squared, and how many tokens were summed — what ``llama-imatrix`` computes and the low-bit
quantizers (IQ1…IQ3, Q2_K_S) need to choose which weights to keep precise. It is read here in
the same process, from ggml's scheduler callback, while llama.cpp evaluates the text in chunks
exactly as llama-imatrix does (n_ctx tokens from an empty cache, BOS first, every position's
output computed so the last layer sees every token), and saved in llama-imatrix's GGUF format
(``<weight>.in_sum2`` and ``<weight>.counts`` tensors), so either tool reads the other's files.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import Cancelled, ImatrixError, InvalidGGUFError, UsageError
from edgellm.fsutil import atomic_path
from edgellm.system import ggml

if TYPE_CHECKING:
    from edgellm.gguf.header import GGUFHeader

#: tokens per decode, as llama-imatrix's default batch (it packs n_batch / n_ctx chunks in one)
N_BATCH = 2048
#: llama-imatrix skips multiplications of fewer tokens than this (single-token decodes)
MIN_TOKENS = 16
GGML_TYPE_F32 = 0

#: (chunks done, chunks in all, tokens per second)
Progress = Callable[[int, int, float], None]


@dataclass
class ImportanceMatrix:
    """Per weight: ``sums`` (n_mat, n_in) float64 — the squared activations summed, one row per
    expert (one for a dense weight) — and ``counts`` (n_mat,), the tokens each row summed."""

    sums: dict[str, object] = field(default_factory=dict)
    counts: dict[str, object] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None  # the file it was read from or saved to, as named (quantized models record it)

    def normalized(self) -> dict[str, object]:
        """What a quantizer weighs columns by: each row's mean squared activation, float32 (1 for
        an expert no token reached), as llama-quantize reads an imatrix file."""
        import numpy as np

        out = {}
        for name, sums in self.sums.items():
            counts = self.counts[name].astype(np.float32)
            rows = sums.astype(np.float32) / np.where(counts > 0, counts, 1)[:, None]
            rows[counts == 0] = 1.0
            out[name] = np.ascontiguousarray(rows.reshape(-1), dtype=np.float32)
        return out

    def save(self, path: Path) -> None:
        """Write the file at ``path``, which appears whole or not at all."""
        with atomic_path(Path(path)) as tmp:
            self.write(tmp)
        self.path = Path(path)

    def write(self, path: Path) -> None:
        """Write llama-imatrix's GGUF format: keys, then ``<name>.in_sum2`` [n_in, n_mat] and
        ``<name>.counts`` [1, n_mat] float32 tensors in name order. Written here, not with gguf-py:
        importing gguf loads sentencepiece's C++ extension, after which a model load in llama.cpp's
        CUDA build crashes, and a quantization follows this in the same process."""
        import numpy as np

        tensors = []
        for name in sorted(self.sums):
            sums, counts = self.sums[name], self.counts[name]
            tensors.append((f"{name}.in_sum2", sums.astype(np.float32), (sums.shape[1], sums.shape[0])))
            tensors.append((f"{name}.counts", counts.astype(np.float32), (1, counts.shape[0])))
        metadata = [
            ("general.type", _STRING, "imatrix"),
            ("imatrix.datasets", _ARRAY, list(self.datasets)),
            ("imatrix.chunk_count", _UINT32, self.chunk_count),
            ("imatrix.chunk_size", _UINT32, self.chunk_size),
        ]
        with open(path, "wb") as out:
            out.write(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata)))
            for key, vtype, value in metadata:
                out.write(_gguf_string(key) + struct.pack("<I", vtype))
                if vtype == _STRING:
                    out.write(_gguf_string(value))
                elif vtype == _UINT32:
                    out.write(struct.pack("<I", value))
                else:
                    out.write(struct.pack("<IQ", _STRING, len(value)) + b"".join(map(_gguf_string, value)))
            offset = 0
            for name, data, shape in tensors:
                out.write(_gguf_string(name) + struct.pack("<I", len(shape)))
                out.write(struct.pack(f"<{len(shape)}QIQ", *shape, GGML_TYPE_F32, offset))
                offset += _align(data.nbytes)
            out.write(b"\0" * (_align(out.tell()) - out.tell()))
            for _, data, _ in tensors:
                out.write(data.tobytes())
                out.write(b"\0" * (_align(data.nbytes) - data.nbytes))


_UINT32, _STRING, _ARRAY = 4, 8, 9
_ALIGNMENT = 32


def _gguf_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _align(n: int) -> int:
    return (n + _ALIGNMENT - 1) // _ALIGNMENT * _ALIGNMENT


def load_imatrix(path: str | Path) -> ImportanceMatrix:
    """Read an imatrix GGUF (edgellm's or llama-imatrix's); a file that is not one, or whose sums
    and counts disagree, is refused with ImatrixError naming the problem."""
    import numpy as np

    from edgellm.gguf.header import ArrayValue, read_header

    path = Path(path)
    try:
        header = read_header(path, model=False)
    except InvalidGGUFError as exc:
        raise ImatrixError(f"{path.name} is not an importance matrix: {exc.message}",
                           hint="make one with `edgellm imatrix MODEL`") from None
    md = header.metadata
    if md.get("general.type") != "imatrix":
        raise ImatrixError(f"{path.name} is a GGUF but not an importance matrix (general.type is "
                           f"{md.get('general.type')!r})", hint="make one with `edgellm imatrix MODEL`")
    matrix = ImportanceMatrix(path=path)
    datasets = md.get("imatrix.datasets")
    if isinstance(datasets, ArrayValue) and datasets.values:
        matrix.datasets = [str(v) for v in datasets.values]
    for key, attr in (("imatrix.chunk_count", "chunk_count"), ("imatrix.chunk_size", "chunk_size")):
        value = md.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ImatrixError(f"{path.name} has no {key}, which llama.cpp's tools need")
        setattr(matrix, attr, value)
    tensors = {t.name: t for t in header.tensors}
    for name, info in tensors.items():
        if not name.endswith(".in_sum2"):
            if not name.endswith(".counts"):
                raise ImatrixError(f"{path.name} holds an unexpected tensor {name!r}")
            continue
        weight = name[: -len(".in_sum2")]
        counts_info = tensors.get(f"{weight}.counts")
        if counts_info is None:
            raise ImatrixError(f"{path.name} has sums but no counts for {weight}")
        if info.type_name != "F32" or counts_info.type_name != "F32":
            raise ImatrixError(f"{path.name}: the sums and counts of {weight} must be F32")
        n_mat = counts_info.n_elements
        if info.n_elements % n_mat:
            raise ImatrixError(f"{path.name}: {weight} has {info.n_elements} sums for {n_mat} counts")
        sums = np.fromfile(path, dtype="<f4", count=info.n_elements, offset=info.offset)
        counts = np.fromfile(path, dtype="<f4", count=n_mat, offset=counts_info.offset)
        if not (np.isfinite(sums).all() and np.isfinite(counts).all() and (counts >= 0).all()):
            raise ImatrixError(f"{path.name}: {weight} has values that are not finite, or negative counts")
        if (sums < 0).any():  # sums of squares: llama.cpp's low-bit quantizers abort on what cannot be
            raise ImatrixError(f"{path.name}: {weight} has negative sums of squared activations")
        matrix.sums[weight] = sums.astype(np.float64).reshape(n_mat, -1)
        matrix.counts[weight] = counts.astype(np.int64)
    for name in tensors:
        if name.endswith(".counts") and name[: -len(".counts")] not in matrix.sums:
            raise ImatrixError(f"{path.name} has counts but no sums for {name[: -len('.counts')]}")
    if not matrix.sums:
        raise ImatrixError(f"{path.name} holds no importance data")
    return matrix


# -- reading activations from ggml's scheduler -----------------------------------------------------
class _Tensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h), read only; the layout is checked against ggml at first use
    (ggml's element count of a node against the one read through these fields)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@cache
def _mul_mat_ops() -> tuple[int, int]:
    """The MUL_MAT and MUL_MAT_ID op numbers, looked up by name (a ggml with more ops still works)."""
    lib = ggml.base()
    ops = {}
    for op in range(256):
        name = lib.ggml_op_name(op)
        if name in (b"MUL_MAT", b"MUL_MAT_ID"):
            ops[name] = op
        if len(ops) == 2:
            return ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"]
    raise ImatrixError("this ggml has no MUL_MAT operation to read activations from")


def weight_name(raw: bytes) -> str:
    """``CUDA0#blk.0.attn_k.weight#0`` -> ``blk.0.attn_k.weight``: the scheduler's copies of a
    weight on another device carry the device and a copy number around the name."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The scheduler callback: says yes to weight multiplications, then sums their inputs squared."""

    def __init__(self, process_output: bool) -> None:
        self.lib, (self.mul_mat, self.mul_mat_id) = ggml.base(), _mul_mat_ops()
        self.process_output = process_output
        self.sums: dict[str, object] = {}
        self.counts: dict[str, object] = {}
        self.error: BaseException | None = None
        self._checked = False

    def __call__(self, address: int, ask: bool) -> bool:
        try:
            t = _Tensor.from_address(address)
            if ask:
                return self._wanted(t)
            if not self._checked:
                self._check_layout(address, t)
            if t.op == self.mul_mat_id:
                self._experts(t)
            else:
                self._dense(t)
            return True
        except BaseException as exc:  # an exception cannot cross into C: keep it, stop the graph
            self.error = exc
            return False

    def _wanted(self, t: _Tensor) -> bool:
        if t.op == self.mul_mat_id:
            return True
        if t.op != self.mul_mat:
            return False
        src1 = _Tensor.from_address(t.src[1])
        if src1.ne[1] < MIN_TOKENS or src1.type != GGML_TYPE_F32:
            return False
        name = weight_name(_Tensor.from_address(t.src[0]).name)
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def _check_layout(self, address: int, t: _Tensor) -> None:
        """Our copy of ggml_tensor must match this ggml's: compare what both say of the node."""
        ne = t.ne
        if self.lib.ggml_nelements(address) != ne[0] * ne[1] * ne[2] * ne[3]:
            raise ImatrixError("this llama.cpp's ggml_tensor layout differs from the one edgellm reads")
        self._checked = True

    def _array(self, address: int):
        """A tensor's data as a (ne3, ne2, ne1, ne0) array, copied off a GPU when it lives there."""
        import numpy as np

        t = _Tensor.from_address(address)
        nbytes = self.lib.ggml_nbytes(address)
        if self.lib.ggml_backend_buffer_is_host(t.buffer):
            buffer = (ctypes.c_char * nbytes).from_address(t.data)
        else:
            buffer = ctypes.create_string_buffer(nbytes)
            self.lib.ggml_backend_tensor_get(address, buffer, 0, nbytes)
        dtype = np.float32 if t.type == GGML_TYPE_F32 else np.int32
        return np.ndarray(shape=tuple(reversed(t.ne[:4])), dtype=dtype, buffer=buffer,
                          strides=tuple(reversed(t.nb[:4])))

    def _entry(self, name: str, n_mat: int, n_in: int):
        import numpy as np

        sums = self.sums.get(name)
        if sums is None:
            sums = self.sums[name] = np.zeros((n_mat, n_in), dtype=np.float64)
            self.counts[name] = np.zeros(n_mat, dtype=np.int64)
        elif sums.shape != (n_mat, n_in):
            raise ImatrixError(f"{name} was multiplied with inputs of two shapes ({sums.shape} and {(n_mat, n_in)})")
        return sums, self.counts[name]

    def _dense(self, t: _Tensor) -> None:
        import numpy as np

        src0 = _Tensor.from_address(t.src[0])
        name = weight_name(src0.name)
        x = self._array(t.src[1])  # (ne3, ne2, ne1 tokens, ne0 inputs)
        n_mat = src0.ne[2] * src0.ne[3]
        sums, counts = self._entry(name, n_mat, x.shape[3])
        for i3 in range(x.shape[0]):
            for i2 in range(x.shape[1]):
                mat = (i3 % src0.ne[3]) * src0.ne[2] + (i2 % src0.ne[2])
                rows = x[i3, i2]
                sums[mat] += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        counts += x.shape[0] * x.shape[1] * x.shape[2] // n_mat
        if not np.isfinite(sums).all():
            raise ImatrixError(f"the activations into {name} are not finite: the model overflows on this text")

    def _experts(self, t: _Tensor) -> None:
        """MUL_MAT_ID: src0 stacks the experts [n_in, n_out, n_expert]; src1 holds each token's
        inputs [n_in, n_used or 1, n_tokens]; src2 which expert each token went to."""
        import numpy as np

        src0 = _Tensor.from_address(t.src[0])
        name = weight_name(src0.name)
        x = self._array(t.src[1])[0]  # (n_tokens, n_used or 1, n_in)
        ids = self._array(t.src[2])[0, 0]  # (n_tokens, n_used)
        n_expert = src0.ne[2]
        if ids.min(initial=0) < 0 or ids.max(initial=0) >= n_expert:
            raise ImatrixError(f"{name}: an expert id outside 0..{n_expert - 1}")
        sums, counts = self._entry(name, n_expert, x.shape[2])
        for slot in range(ids.shape[1]):
            rows = x[:, slot % x.shape[1], :]
            np.add.at(sums, ids[:, slot], np.square(rows, dtype=np.float64))
            counts += np.bincount(ids[:, slot], minlength=n_expert)
        if not np.isfinite(sums).all():
            raise ImatrixError(f"the activations into {name} are not finite: the model overflows on this text")


def compute_imatrix(
    model_path: Path,
    text: str,
    *,
    n_ctx: int = 512,
    chunks: int | None = None,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    dataset: str = "",
    process_output: bool = False,
    on_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> ImportanceMatrix:
    """The importance matrix of the model at ``model_path`` on ``text``, in chunks of ``n_ctx``
    tokens (at most ``chunks`` of them), ``n_gpu_layers`` offloaded (-1: all; activations on a GPU
    are copied back to be summed). ``dataset`` is recorded in the file as the text's name;
    ``process_output`` includes output.weight (llama-imatrix's --process-output)."""
    from edgellm.eval import text_chunks
    from edgellm.runtime.native import NativeModel
    from edgellm.system.hardware import physical_cores

    if n_ctx < MIN_TOKENS:
        raise UsageError(f"--ctx must be at least {MIN_TOKENS} for an importance matrix, got {n_ctx}")
    threads = threads or physical_cores()
    collector = _Collector(process_output)
    with NativeModel(model_path, n_gpu_layers) as model:
        pieces = text_chunks(model, text, n_ctx, chunks, "an importance matrix")
        n_chunks = len(pieces)
        n_seq = max(1, N_BATCH // n_ctx)
        with model.context(n_ctx=n_ctx * n_seq, n_batch=min(N_BATCH, n_ctx * n_seq), n_ubatch=512,
                           n_threads=threads, n_seq_max=n_seq, eval_callback=collector) as ctx:
            start = time.perf_counter()
            for c0 in range(0, n_chunks, n_seq):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("importance matrix cancelled; no file was written")
                group = pieces[c0 : c0 + n_seq]
                ctx.clear()
                ctx.evaluate(group)
                if collector.error is not None:
                    raise collector.error
                done = c0 + len(group)
                if on_progress:
                    on_progress(done, n_chunks, done * n_ctx / max(time.perf_counter() - start, 1e-9))
    if not collector.sums:
        raise ImatrixError(f"{Path(model_path).name} has no weight multiplications edgellm could read")
    return ImportanceMatrix(collector.sums, collector.counts, [dataset] if dataset else [], n_chunks, n_ctx)


def gpu_layers_for(header: GGUFHeader, n_ctx: int = 512, requested: int | None = None) -> int:
    """``requested`` layers on the GPU (-1: all), or when None as many as the planner fits beside
    the context an importance matrix evaluates in (n_batch / n_ctx chunks at once)."""
    from edgellm.plan.fit import fit
    from edgellm.system.hardware import probe

    if requested is not None:
        return requested
    plan = fit(header, probe(), n_ctx=max(N_BATCH, n_ctx), n_ubatch=512, n_outputs=0)
    return plan.n_gpu_layers if plan.fits else 0


def calibration_text() -> str:
    """The calibration text edgellm ships: prose, code, lists and several languages, written for
    edgellm (what ``edgellm imatrix`` uses without ``--text``)."""
    from importlib.resources import files

    return files("edgellm").joinpath("data/calibration.txt").read_text(encoding="utf-8")

