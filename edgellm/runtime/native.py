"""llama.cpp's own model and context objects, without llama-cpp-python's high-level ``Llama``.

The benchmark needs exactly what llama-bench does (one model reused across contexts, a context
sized per test, raw ``llama_decode`` calls); the batched server needs several sequences in one
context. Both go through these two small wrappers, which turn llama.cpp's NULL returns into
LoadError with the cause llama.cpp logged.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import EngineError, LoadError
from edgellm.options import KV_TYPES
from edgellm.runtime.text import PieceTable
from edgellm.system import llamalog
from edgellm.system.devices import cpu_threadpool

FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}

if TYPE_CHECKING:
    import numpy as np

#: ggml's scheduler callback, given the address of a ``ggml_tensor`` and whether it only asks
EvalCallback = Callable[[int, bool], bool]


def _lib():
    import llama_cpp

    llamalog.install()
    llama_cpp.llama_backend_init()
    return llama_cpp


def check_loadable(path: str | Path) -> None:
    """Have llama.cpp load a GGUF's hyperparameters, vocabulary and every tensor's shape, allocating
    and reading no weights; LoadError with llama.cpp's own reason when it cannot (a file a
    converter wrote that llama.cpp would refuse is then never kept)."""
    lib = _lib()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    params.no_alloc = True
    params.load_mode = 0  # LLAMA_LOAD_MODE_NONE: llama.cpp maps nothing when it allocates nothing
    position = llamalog.mark()
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise LoadError(llamalog.last_error(position) or "unknown error")
    lib.llama_model_free(model)


class NativeModel:
    """A loaded ``llama_model``; contexts are made from it as needed."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, lora: Path | None = None,
                 lora_scale: float = 1.0, tensor_split: tuple[float, ...] = ()) -> None:
        """``lora``: a GGUF LoRA adapter every context of this model applies, at ``lora_scale``;
        ``tensor_split``: each GPU's (or RPC worker's) share of the offloaded layers."""
        lib = self._lib = _lib()
        self.path = Path(path)
        self.n_gpu_layers = n_gpu_layers
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 2**31 - 1 if n_gpu_layers < 0 else n_gpu_layers
        split = (ctypes.c_float * max(len(tensor_split), 1))(*tensor_split)  # alive until the load returns
        if tensor_split:
            params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        position = llamalog.mark()
        self.ptr = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            cause = llamalog.last_error(position) or "unknown error"
            raise LoadError(f"llama.cpp could not load {self.path.name}: {cause}")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.piece = PieceTable(self.vocab)
        self._ends: dict[int, bool] = {}
        self.lora, self.lora_scale = None, lora_scale
        if lora is not None:
            position = llamalog.mark()
            self.lora = lib.llama_adapter_lora_init(self.ptr, str(lora).encode())  # freed with the model
            if not self.lora:
                self.close()
                cause = llamalog.last_error(position) or "unknown error"
                raise LoadError(f"llama.cpp could not apply LoRA {Path(lora).name}: {cause}")

    def is_end(self, token: int) -> bool:
        """Whether a token ends generation (asked of llama.cpp once per token: it runs every step)."""
        end = self._ends.get(token)
        if end is None:
            end = self._ends[token] = bool(self._lib.llama_vocab_is_eog(self.vocab, token))
        return end

    @property
    def bos_text(self) -> str:
        return self.piece.text(self._lib.llama_vocab_bos(self.vocab))

    @property
    def eos_text(self) -> str:
        return self.piece.text(self._lib.llama_vocab_eos(self.vocab))

    @property
    def description(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._lib.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    @property
    def size(self) -> int:
        return self._lib.llama_model_size(self.ptr)

    @property
    def n_params(self) -> int:
        return self._lib.llama_model_n_params(self.ptr)

    @property
    def n_vocab(self) -> int:
        return self._lib.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        lib = self._lib
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        buf = (lib.llama_token * capacity)()
        n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        if n < 0:  # the text needs more room than one token per byte (never, but be exact)
            capacity = -n
            buf = (lib.llama_token * capacity)()
            n = lib.llama_tokenize(self.vocab, raw, len(raw), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def prompt_tokens(self, text: str) -> list[int]:
        """A rendered prompt's tokens: special tokens parsed, BOS added as the vocabulary wants, once
        (not again when the chat template already wrote it: a second BOS hurts answers)."""
        bos = self.bos_text
        return self.tokenize(text, add_special=not (bos and text.startswith(bos)), parse_special=True)

    @property
    def bos(self) -> int | None:
        """The BOS token when the vocabulary asks for one at the start of a text."""
        if self._lib.llama_vocab_get_add_bos(self.vocab):
            return self._lib.llama_vocab_bos(self.vocab)
        return None

    def context(
        self,
        n_ctx: int,
        n_batch: int = 2048,
        n_ubatch: int = 512,
        n_threads: int = 1,
        type_k: str = "f16",
        type_v: str = "f16",
        flash_attn: str = "auto",
        n_seq_max: int = 1,
        swa_full: bool = False,
        embeddings: bool = False,
        op_offload: bool = True,
        eval_callback: EvalCallback | None = None,
        n_outputs: int = 0,
    ) -> NativeContext:
        """A context; ``n_outputs`` is the most logits rows one batch will ask for (0: ``n_batch``,
        as perplexity needs): llama.cpp reserves that many rows of the vocabulary in the compute
        buffer, 96 MiB for a 512-token batch of a 49k vocabulary where a server decoding for four
        needs 0.8 (llama-server reserves a row per sequence); a batch asking for more aborts the
        process. ``swa_full`` keeps sliding-window layers' whole cache (for prompt reuse);
        ``embeddings`` makes it pool each sequence's hidden states into one vector (mean);
        ``op_offload`` off keeps batches of host layers on the CPU (no GPU compute buffer);
        ``eval_callback(tensor, ask)`` is ggml's scheduler callback: asked about every graph node,
        it sees the data of those it says yes to (how an importance matrix reads activations)."""
        return NativeContext(
            self, n_ctx, n_batch, n_ubatch, n_threads, type_k, type_v, flash_attn, n_seq_max, swa_full, embeddings,
            op_offload, eval_callback, n_outputs,
        )

    def close(self) -> None:
        if self.ptr:
            self._lib.llama_model_free(self.ptr)
            self.ptr = None

    def __enter__(self) -> NativeModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NativeContext:
    """A ``llama_context``: KV cache, compute buffers and threads for one model."""

    def __init__(
        self,
        model: NativeModel,
        n_ctx: int,
        n_batch: int,
        n_ubatch: int,
        n_threads: int,
        type_k: str,
        type_v: str,
        flash_attn: str,
        n_seq_max: int,
        swa_full: bool,
        embeddings: bool,
        op_offload: bool = True,
        eval_callback: EvalCallback | None = None,
        n_outputs: int = 0,
    ) -> None:
        lib = self._lib = model._lib
        self.model = model
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = min(n_ubatch, n_batch)
        params.n_seq_max = n_seq_max
        params.n_outputs_max = max(n_outputs, n_seq_max) if n_outputs else 0  # llama.cpp keeps a row per sequence
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.type_k = KV_TYPES[type_k][0]
        params.type_v = KV_TYPES[type_v][0]
        params.flash_attn_type = FLASH_ATTN_TYPES[flash_attn]
        params.swa_full = swa_full
        params.op_offload = op_offload
        if embeddings:
            params.embeddings = True
            params.pooling_type = lib.LLAMA_POOLING_TYPE_MEAN
        params.no_perf = True
        if eval_callback is not None:
            # kept on the context: llama.cpp calls it for as long as the context lives
            self._eval_callback = lib.ggml_backend_sched_eval_callback(lambda t, ask, _: eval_callback(t, ask))
            params.cb_eval = self._eval_callback
        position = llamalog.mark()
        self.ptr = lib.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            cause = llamalog.last_error(position) or "unknown error"
            raise LoadError(f"llama.cpp could not create a context for {model.path.name}: {cause}")
        self.n_batch = n_batch
        self._one = (lib.llama_token * 1)()
        self._n_vocab = model.n_vocab
        # llama_get_logits_ith returning the bare address (the binding's returns a ctypes pointer,
        # whose numpy view costs more than the argmax it serves) and the views made so far, by address
        self._logits_address = lib.llama_cpp._lib["llama_get_logits_ith"]
        self._logits_address.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        self._logits_address.restype = ctypes.c_void_p
        self._logits_views: dict[int, Any] = {}
        self._free_pool = _attach_threadpool(self.ptr, n_threads)
        if model.lora:
            adapters = (lib.llama_adapter_lora_p_ctypes * 1)(model.lora)
            scales = (ctypes.c_float * 1)(model.lora_scale)
            if lib.llama_set_adapters_lora(self.ptr, adapters, 1, scales) != 0:
                self.close()
                raise LoadError(f"llama.cpp could not apply the LoRA to a context of {model.path.name}")

    def logits_at(self, index: int) -> np.ndarray:
        """The logits of the last decode's output at batch ``index`` (-1: the last), as a float32
        view of llama.cpp's own buffer, valid until the next decode. It runs for every token: a
        view is made once per address."""
        address = self._logits_address(self.ptr, index)
        if not address:
            raise EngineError(f"llama.cpp has no logits at batch index {index}")
        view = self._logits_views.get(address)
        if view is None:
            import numpy as np

            view = np.frombuffer((ctypes.c_float * self._n_vocab).from_address(address), dtype=np.float32)
            self._logits_views[address] = view
        return view

    def decode(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens as the next positions of sequence 0."""
        lib = self._lib
        if len(tokens) == 1:
            self._one[0] = tokens[0]
            array = self._one
        else:
            array = (lib.llama_token * len(tokens))(*tokens)
        status = lib.llama_decode(self.ptr, lib.llama_batch_get_one(array, len(tokens)))
        if status != 0:
            raise LoadError(f"llama_decode failed with status {status}")

    def logits(self, sequences: Sequence[Sequence[int]], first: int) -> list:
        """Evaluate each sequence from position 0 (as sequence ids 0, 1, ...) in shared batches,
        and return, per sequence, the logits of positions ``first`` onwards ((n, n_vocab) float32).

        The cache must be empty. Several sequences must fit one batch together (as llama-perplexity
        packs its chunks); a single sequence may be longer than the batch.
        """
        import numpy as np

        n_vocab = self.model.n_vocab
        outs = [np.empty((len(seq) - first, n_vocab), dtype=np.float32) for seq in sequences]
        filled = [0] * len(sequences)
        for part in self._packed(sequences, first):
            scored = [s for s, pos in part if pos >= first]
            if scored:
                ptr = self._lib.llama_get_logits(self.ptr)
                rows = np.ctypeslib.as_array(ptr, shape=(len(scored) * n_vocab,)).reshape(len(scored), n_vocab)
                row = 0
                for s in dict.fromkeys(scored):
                    n = scored.count(s)
                    outs[s][filled[s] : filled[s] + n] = rows[row : row + n]
                    filled[s] += n
                    row += n
        return outs

    def evaluate(self, sequences: Sequence[Sequence[int]]) -> None:
        """Evaluate sequences as logits() does, with every position's output computed and none
        kept: the last layer then runs on every token, as an importance matrix needs."""
        for _ in self._packed(sequences, 0):
            pass

    def _packed(self, sequences: Sequence[Sequence[int]], first: int) -> Iterator[list[tuple[int, int]]]:
        """Decode the sequences in shared batches, outputs from position ``first``; yields each
        decoded batch's (sequence, position) slots."""
        lib = self._lib
        if len(sequences) > 1 and sum(map(len, sequences)) > self.n_batch:
            raise ValueError("sequences evaluated together must fit one batch")
        # (sequence, position) of every token, in the order the batch holds them
        slots = [(s, pos) for s, seq in enumerate(sequences) for pos in range(len(seq))]
        batch = lib.llama_batch_init(self.n_batch, 0, 1)
        try:
            for start in range(0, len(slots), self.n_batch):
                part = slots[start : start + self.n_batch]
                for i, (s, pos) in enumerate(part):
                    batch.token[i] = sequences[s][pos]
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = s
                    batch.logits[i] = pos >= first
                batch.n_tokens = len(part)
                status = lib.llama_decode(self.ptr, batch)
                if status != 0:
                    raise LoadError(f"llama_decode failed with status {status}")
                yield part
        finally:
            lib.llama_batch_free(batch)

    def synchronize(self) -> None:
        self._lib.llama_synchronize(self.ptr)

    def clear(self) -> None:
        """Forget every sequence (the KV cache's metadata; the memory stays allocated)."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self.ptr), False)

    def close(self) -> None:
        if self.ptr:
            self._lib.llama_free(self.ptr)
            self.ptr = None
            if self._free_pool is not None:
                self._free_pool()

    def __enter__(self) -> NativeContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _attach_threadpool(ctx: int, n_threads: int) -> Callable[[], None] | None:
    """Give the context a persistent CPU thread pool (llama.cpp's tools do the same; without one,
    ggml starts its threads anew for every token). Returns what frees it, once the context is."""
    import llama_cpp.llama_cpp as binding

    made = cpu_threadpool(n_threads)
    if made is None:
        return None
    pool, free = made
    attach = binding._lib.llama_attach_threadpool
    attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    attach.restype = None
    attach(ctx, pool, None)  # the same pool for batches
    return free
