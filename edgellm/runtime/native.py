"""The llama.cpp boundary: its model, context, batch and sampler objects, without llama-cpp-python's
high-level ``Llama``. Nothing else in edgellm calls the binding to run a model.

The benchmark needs exactly what llama-bench does (one model reused across contexts, a context
sized per test, raw ``llama_decode`` calls); the batched engine needs several sequences in one
context, a batch it fills in place and a sampler chain per answer. All go through these small
wrappers, which turn llama.cpp's NULL returns into LoadError with the cause llama.cpp logged.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import EngineError, LoadError, UsageError
from edgellm.options import DEFAULT_SEED, KV_TYPES, SamplingOptions
from edgellm.system import ggml, llamalog
from edgellm.system.devices import cpu_threadpool

FLASH_ATTN_TYPES = {"auto": -1, "off": 0, "on": 1}

if TYPE_CHECKING:
    import numpy as np

#: ggml's scheduler callback, given the address of a ``ggml_tensor`` and whether it only asks
EvalCallback = Callable[[int, bool], bool]


@dataclass(frozen=True)
class ContextParams:
    """What an engine's context is made with, decided once (runtime/loader.py) and passed whole."""

    n_ctx: int  # each sequence's
    n_batch: int = 512
    n_threads: int = 1
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: str = "auto"  # auto | on | off
    op_offload: bool = True  # off: batches of host layers stay on the CPU (no GPU compute buffer)


def _lib():
    return ggml.llama()


def schema_grammar(schema_json: str) -> str:
    """llama-cpp-python's port of llama.cpp's json-schema-to-grammar (remote references never fetched)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json)


def json_object_grammar() -> str:
    """GBNF for any JSON object: llama.cpp's own json.gbnf."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


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


class PieceTable:
    """The bytes each token stands for, looked up once per token (special tokens render as nothing).

    llama-cpp-python's own detokenizer truncates pieces longer than 32 bytes; this one does not.
    """

    def __init__(self, vocab) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._vocab = vocab
        self._pieces: dict[int, bytes] = {}
        self._buf = ctypes.create_string_buffer(256)

    def __call__(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        lib, buf = self._lib, self._buf
        n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        data = buf.raw[:n]
        self._pieces[token] = data
        return data

    def text(self, token: int) -> str:
        """The token's own text in the vocabulary (``<|im_start|>`` for special tokens)."""
        if token < 0:
            return ""
        return self._lib.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")


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

    @property
    def n_embd(self) -> int:
        return self._lib.llama_model_n_embd(self.ptr)

    def vocabulary_difference(self, other: NativeModel, check_from: int, max_size_difference: int) -> str | None:
        """How ``other``'s tokens mean something else than this model's (None: they do not): the
        kind of tokenizer, the tokens that begin and end texts, the size, each token's text from
        ``check_from`` on (llama.cpp's own test for a draft model)."""
        lib, mine, theirs = self._lib, self.vocab, other.vocab
        if lib.llama_vocab_type(mine) != lib.llama_vocab_type(theirs):
            return "has another kind of tokenizer than the model"
        if not (lib.llama_vocab_get_add_bos(mine) == lib.llama_vocab_get_add_bos(theirs)
                and lib.llama_vocab_bos(mine) == lib.llama_vocab_bos(theirs)
                and lib.llama_vocab_eos(mine) == lib.llama_vocab_eos(theirs)):
            return "begins or ends texts with other tokens than the model"
        if abs(self.n_vocab - other.n_vocab) > max_size_difference:
            return f"has {other.n_vocab} tokens, the model {self.n_vocab}: not the same vocabulary"
        for token in range(check_from, min(self.n_vocab, other.n_vocab)):
            if lib.llama_vocab_get_text(mine, token) != lib.llama_vocab_get_text(theirs, token):
                return f"token {token} differs from the model's; not the same vocabulary"
        return None

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
        self._mem = lib.llama_get_memory(self.ptr)
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

    def decode_batch(self, batch: NativeBatch, n_tokens: int) -> int:
        """Decode the first ``n_tokens`` of a filled batch; llama.cpp's status (0: done)."""
        batch.ptr.n_tokens = n_tokens
        return self._lib.llama_decode(self.ptr, batch.ptr)

    def forget(self, seq_id: int, start: int) -> None:
        """Drop a sequence's cache from position ``start`` on (a prompt reused up to there, guesses
        not taken)."""
        self._lib.llama_memory_seq_rm(self._mem, seq_id, start, -1)

    def sample(self, sampler: Sampler, index: int) -> int:
        """The token ``sampler`` picks from the last decode's output at batch ``index``."""
        return self._lib.llama_sampler_sample(sampler.ptr, self.ptr, index)

    def embedding(self, tokens: Sequence[int]) -> np.ndarray:
        """The pooled embedding of ``tokens`` as one sequence (a context made with ``embeddings``)."""
        import numpy as np

        lib = self._lib
        self.clear()
        array = (lib.llama_token * len(tokens))(*tokens)
        if lib.llama_decode(self.ptr, lib.llama_batch_get_one(array, len(tokens))) != 0:
            raise EngineError("llama_decode failed while embedding")
        ptr = lib.llama_get_embeddings_seq(self.ptr, 0)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).astype(np.float64)

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


class NativeBatch:
    """A ``llama_batch`` of up to ``capacity`` tokens over several sequences. ``arrays`` are its
    token, position, sequence count, sequence id and output arrays, filled in place before each
    decode (taken once: ctypes makes a new pointer object at every field access)."""

    def __init__(self, capacity: int) -> None:
        self._lib = _lib()
        self.ptr = self._lib.llama_batch_init(capacity, 0, 1)
        self.arrays = (self.ptr.token, self.ptr.pos, self.ptr.n_seq_id, self.ptr.seq_id, self.ptr.logits)

    def close(self) -> None:
        if self.arrays:
            self.arrays = ()
            self._lib.llama_batch_free(self.ptr)


class Sampler:
    """A llama.cpp sampler chain: how one answer picks its tokens (sampler_for builds it)."""

    def __init__(self, ptr: int) -> None:
        self._lib = _lib()
        self.ptr = ptr

    def close(self) -> None:
        if self.ptr:
            self._lib.llama_sampler_free(self.ptr)
            self.ptr = None


def grammar_parses(model: NativeModel, grammar: str) -> bool:
    """Whether llama.cpp parses ``grammar`` (whose size and nesting runtime/grammar.py bounded)."""
    lib = model._lib
    probe = lib.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not probe:
        return False
    lib.llama_sampler_free(probe)
    return True


def sampler_for(model: NativeModel, s: SamplingOptions) -> Sampler | None:
    """llama.cpp's sampler chain for the options, or None for plain greedy decoding, which takes
    the largest logit itself: the same token without copying the whole vocabulary into llama.cpp's
    candidate array at every step. A lazy grammar (one with triggers) is not part of the chain: it
    starts later, with a chain made without its triggers."""
    lib = model._lib
    if s.temperature <= 0 and (not s.grammar or s.grammar_triggers) and s.repeat_penalty == 1.0 \
            and not s.presence_penalty and not s.frequency_penalty and not s.logit_bias:
        return None
    n_vocab = model.n_vocab
    chain = Sampler(lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params()))
    try:
        if s.logit_bias:
            if any(not 0 <= token < n_vocab for token, _ in s.logit_bias):
                raise UsageError(f"a logit bias names a token outside the vocabulary of {n_vocab}")
            biases = (lib.llama_logit_bias * len(s.logit_bias))(*(lib.llama_logit_bias(t, b) for t, b in s.logit_bias))
            lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))
        if s.grammar and not s.grammar_triggers:
            grammar = lib.llama_sampler_init_grammar(model.vocab, s.grammar.encode(), b"root")
            if not grammar:
                raise UsageError("the response format could not be turned into a grammar")
            lib.llama_sampler_chain_add(chain.ptr, grammar)
    except BaseException:
        chain.close()
        raise
    if s.repeat_penalty != 1.0 or s.presence_penalty or s.frequency_penalty:
        lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_penalties(
            n_vocab, 64, s.repeat_penalty, s.frequency_penalty, s.presence_penalty))
    if s.temperature <= 0:
        lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_greedy())
        return chain
    if s.top_k > 0:
        lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_top_k(s.top_k))
    lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_top_p(s.top_p, 1))
    lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_min_p(s.min_p, 1))
    lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_temp(s.temperature))
    seed = DEFAULT_SEED if s.seed < 0 else s.seed & 0xFFFFFFFF
    lib.llama_sampler_chain_add(chain.ptr, lib.llama_sampler_init_dist(seed))
    return chain


class QuantizeParams:
    """``llama_model_quantize_params``, with the arrays its pointers point into kept alive beside it.
    ``imatrix``: each weight's importance row; ``kv``: keys written into the output (int or text);
    ``tensor_types``: (name pattern, ggml type) overrides."""

    def __init__(self, ftype: int, threads: int, allow_requantize: bool, quantize_output_tensor: bool, pure: bool,
                 output_tensor_type: int | None, token_embedding_type: int | None,
                 imatrix: dict[str, np.ndarray] | None, kv: Sequence[tuple[str, int | str]],
                 tensor_types: Sequence[tuple[str, int]]) -> None:
        lib = _lib()
        self.params = params = lib.llama_model_quantize_default_params()
        params.nthread = threads
        params.ftype = ftype
        params.allow_requantize = allow_requantize
        params.quantize_output_tensor = quantize_output_tensor
        params.pure = pure
        if output_tensor_type is not None:
            params.output_tensor_type = output_tensor_type
        if token_embedding_type is not None:
            params.token_embedding_type = token_embedding_type
        self._alive: list[object] = []
        if imatrix is not None:
            entries = (lib.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-ended
            for slot, (name, values) in zip(entries, imatrix.items()):
                slot.name = name.encode()
                slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
                slot.size = values.size
            self._alive += [entries, imatrix]
            params.imatrix = entries
        if kv:
            overrides = (lib.llama_model_kv_override * (len(kv) + 1))()
            for slot, (key, value) in zip(overrides, kv):
                slot.key = key.encode()
                if isinstance(value, int):
                    slot.tag, slot.value.val_i64 = lib.LLAMA_KV_OVERRIDE_TYPE_INT, value
                else:  # llama-quantize keeps the first 127 bytes
                    slot.tag, slot.value.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, value.encode()[:127]
            self._alive.append(overrides)
            params.kv_overrides = overrides
        if tensor_types:
            types = (lib.llama_model_tensor_override * (len(tensor_types) + 1))()
            for slot, (pattern, ggml_type) in zip(types, tensor_types):
                slot.pattern, slot.type = pattern.encode(), ggml_type
            self._alive.append(types)
            params.tt_overrides = types


def quantize_model(source: Path, output: Path | None, params: QuantizeParams) -> int:
    """llama.cpp's quantizer, from ``source`` into ``output`` (None: a dry run that reads no weight
    and logs each tensor's size); llama.cpp's status (0: done)."""
    params.params.dry_run = output is None
    target = b"" if output is None else str(output).encode()
    return _lib().llama_model_quantize(str(source).encode(), target, params.params)


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
