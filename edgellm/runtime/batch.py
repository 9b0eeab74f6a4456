"""Continuous batching: several requests share one llama.cpp context and advance together.

Each slot is one sequence id in the context. Every step builds one ``llama_batch`` holding the next
token of each answering slot and as much of the waiting prompts as fits, runs one ``llama_decode``,
and samples each slot's next token from its own sampler chain at its batch index. New requests join
between steps. A slot keeps its tokens in the KV cache after its request ends, so a request whose
prompt extends an earlier conversation is placed in that slot and only its new tokens are
evaluated (the prompt cache).

The engine runs in its own thread; results go back through each request's ``emit`` callback, which
receives Chunks (the same streaming contract as the single-sequence runtime) or an exception.

A slot's sampled tokens become text at most every ``TEXT_EVERY`` seconds (and at once for its first
token and its last): on a CPU, the decode between two tokens evicts the Python objects that turn a
token into text from every cache, and a few tokens turned into text together pay for that once.

A consumer in another thread (the server's event loop) is woken when the engine hands llama.cpp the
next decode, through the request's ``flush``: its Python then runs while the decode holds no GIL.
Woken as each chunk was emitted, it took the GIL from the engine between its sampler calls (at four
streams on two cores, 1.2 ms from one decode to the next; now 0.9). The decode beside it pays much of
that back, so a step is only a little shorter, but a token reaches its reader a decode sooner.
"""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from edgellm.errors import EdgeLLMError, EngineError, QueueFullError, UsageError
from edgellm.options import SamplingOptions
from edgellm.plan.memory import engine_outputs
from edgellm.runtime.chunks import Chunk, TokenLogprob
from edgellm.runtime.native import (
    ContextParams,
    NativeBatch,
    NativeContext,
    NativeModel,
    Sampler,
    grammar_parses,
    sampler_for,
)
from edgellm.runtime.text import Answer, ThinkSplitter, common_prefix

if TYPE_CHECKING:
    from edgellm.runtime.speculative import Drafter

#: seconds a sampled token may wait to become text: text moves about 33 times a second (film runs at
#: 24), and each turn of a server's loop and its clients' reads (each a wake-up of another thread, on
#: the cores the next decode runs on) serves twice the tokens it did at 15 ms: steps 0.9-1.6% shorter
#: at 1, 2 and 4 streams on two cores
TEXT_EVERY = 0.030


@dataclass(eq=False)
class GenerationRequest:
    prompt: list[int]
    sampling: SamplingOptions
    emit: Callable[[Chunk | BaseException], None]
    #: called once a step's chunks are emitted, as the engine hands llama.cpp its decode: a consumer
    #: in another thread that holds chunks back until then wakes (an answer's last chunk need not wait)
    flush: Callable[[], None] | None = None
    reasoning: bool = False  # split <think>…</think> into Chunk.reasoning (chat answers)
    thinking: bool = False  # and the prompt already opened the block
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: how many of the prompt's tokens are in the cache or being read (a long prompt's progress)
    read: int = 0


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what the KV cache holds for this sequence
    request: GenerationRequest | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet evaluated
    sampler: Sampler | None = None
    next_token: int | None = None  # sampled, to be evaluated in the next step
    drafts: list[int] = field(default_factory=list)  # the draft's guesses, evaluated after next_token
    batch_index: int = -1
    answer: Answer | None = None
    unsent: list[tuple[int, TokenLogprob | None]] = field(default_factory=list)  # sampled, not yet text
    lazy: _Watch | None = None  # a lazy grammar's watch for its triggers, until one matches


class _Watch:
    """The text an answer writes, watched for the first match of a lazy grammar's triggers. The
    text is decoded as it comes and only its end searched, as this runs for every token."""

    LOOKBACK = 256  # characters before the newest piece a trigger may begin in

    def __init__(self, triggers: Sequence[str]) -> None:
        self.triggers = [re.compile(t) for t in triggers]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.text = ""

    def see(self, piece: bytes) -> str | None:
        """Take the next token's bytes: the text after a trigger once one has matched, else None."""
        start = max(len(self.text) - self.LOOKBACK, 0)
        self.text += self.decoder.decode(piece)
        match = next((m for m in (t.search(self.text, start) for t in self.triggers) if m), None)
        return None if match is None else self.text[match.end():]


class BatchEngine:
    """One model, one context, ``n_parallel`` slots of ``n_ctx`` tokens each."""

    def __init__(
        self,
        model: NativeModel,
        n_parallel: int,
        params: ContextParams,
        max_queue: int = 64,
        threaded: bool = True,
        drafter: Drafter | None = None,
    ) -> None:
        """``params.n_ctx`` is each slot's context. ``threaded`` False: no engine thread; the caller
        advances the engine with ``step()`` (one conversation in the caller's own loop: chat, run,
        the app). ``drafter``: a draft model that proposes tokens for the model to verify
        (speculative.py); the engine closes it."""
        self.model = model
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx = params.n_ctx
        self.n_batch = max(params.n_batch, n_parallel)
        self.n_threads = params.n_threads
        self._embed_ctx: NativeContext | None = None  # made on the first embeddings request
        self.ctx: NativeContext = model.context(
            n_ctx=n_ctx * n_parallel, n_batch=self.n_batch, n_ubatch=min(512, self.n_batch), n_threads=self.n_threads,
            type_k=params.type_k, type_v=params.type_v, flash_attn=params.flash_attn, n_seq_max=n_parallel,
            swa_full=True, op_offload=params.op_offload,
            n_outputs=min(self.n_batch, engine_outputs(n_parallel, drafter.draft_max if drafter else 0)),
        )
        self._batch = NativeBatch(self.n_batch)
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self._text_at = 0.0  # when the slots' sampled tokens last became text
        # on the CPU llama_decode returns once the batch is computed, so a step's text goes out
        # before it (its readers run meanwhile); with layers on a GPU it returns at once, and the
        # text is made while the device computes
        self._text_first = model.n_gpu_layers == 0
        self.drafter = drafter
        self.n_vocab = model.n_vocab
        self.max_queue = max_queue
        self._queue: deque[GenerationRequest] = deque()
        self.broken: BaseException | None = None  # set by abandon()
        self._cond = threading.Condition()
        self.lock = threading.Lock()  # held while the context is in use (one step, or an outside job)
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="edgellm-batch", daemon=True) if threaded else None
        if self._thread:
            self._thread.start()

    # -- the outside -----------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        if not request.prompt:
            raise UsageError("the prompt is empty")
        with self._cond:
            if self.broken is not None:
                raise self.broken
            if len(self._queue) >= self.max_queue:
                raise QueueFullError("every slot is busy and the queue is full", hint="retry shortly")
            self._queue.append(request)
            self._cond.notify()

    def abandon(self, exc: BaseException) -> None:
        """Fail every request, from another thread, when the engine thread is stuck for good
        (a dead RPC worker parks it inside llama_decode); new requests get ``exc`` at once."""
        with self._cond:
            self.broken = exc
            self._stopped = True
            requests = [s.request for s in self.slots if s.request] + list(self._queue)
            self._queue.clear()
        for request in requests:
            request.emit(exc)

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._queue) or any(s.request for s in self.slots)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread:
            self._thread.join(timeout=30)
        if not (self._thread and self._thread.is_alive()):  # not parked for good in a dead RPC worker's decode
            self.ctx.synchronize()  # the last step's decode may still run on the device
        for slot in self.slots:
            self._free_sampler(slot)
        self._batch.close()
        if self.drafter is not None:
            self.drafter.close()
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self.ctx.close()

    # -- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._queue and not any(s.request for s in self.slots):
                    self._cond.wait()
                if self._stopped:
                    self._fail_all(EngineError("the model was unloaded"))
                    return
            self.step()

    def step(self) -> None:
        """Admit waiting requests, then one decode and one sampled token per answering sequence."""
        if self._queue:  # read unlocked (it runs every token): a request appended meanwhile joins next step
            with self._cond:
                self._admit()
        try:
            with self.lock:
                self._step()
        except Exception as exc:  # a decode failure ends the requests in flight, not the server
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self.slots:
            if slot.request:
                slot.request.emit(exc)
                self._release(slot)
        while self._queue:
            self._queue.popleft().emit(exc)

    def _admit(self) -> None:
        """Give waiting requests free slots, preferring the slot whose cache shares most of the prompt."""
        while self._queue:
            free = [s for s in self.slots if s.request is None]
            if not free:
                return
            request = self._queue.popleft()
            if request.cancelled.is_set():
                continue
            try:
                sampler = self._make_sampler(request.sampling)
            except EdgeLLMError as exc:  # this request's problem (a grammar llama.cpp refused), not the engine's
                request.emit(exc)
                continue
            slot = max(free, key=lambda s: common_prefix(s.tokens, request.prompt))
            keep = min(common_prefix(slot.tokens, request.prompt), len(request.prompt) - 1)
            self.ctx.forget(slot.seq_id, keep)
            slot.tokens = request.prompt[:keep]
            slot.pending = request.prompt[keep:]
            request.read = keep
            slot.request = request
            slot.sampler = sampler
            slot.next_token = None
            s = request.sampling
            slot.lazy = _Watch(s.grammar_triggers) if s.grammar and s.grammar_triggers else None
            # the answer ends at max_tokens, or when the sequence's share of the context is full
            room = self.n_ctx - len(request.prompt)
            max_tokens = request.sampling.max_tokens
            slot.answer = Answer(self.model.piece, self.model.is_end, request.sampling, len(request.prompt), keep,
                                 min(max_tokens, room) if max_tokens > 0 else room,
                                 ThinkSplitter(request.thinking) if request.reasoning else None)

    def _make_sampler(self, s: SamplingOptions) -> Sampler | None:
        """The sampler chain for an answer (None: plain greedy); a lazy grammar, which starts
        later, is checked now."""
        if s.grammar and s.grammar_triggers and not grammar_parses(self.model, s.grammar):
            raise UsageError("the response format could not be turned into a grammar")
        return sampler_for(self.model, s)

    def _step(self) -> None:
        """Sample what the last decode computed, then start the next decode and turn the sampled
        tokens into text: text first on the CPU, where llama_decode returns when it is done; decode
        first with layers on a GPU, where llama_decode returns before the device has finished
        (llama.cpp waits when the outputs are read), so the text, the callbacks and what the caller
        does with each chunk overlap the device's work instead of adding to it."""
        picked = [slot for slot in self.slots if slot.request and slot.batch_index >= 0]
        ending = []  # slots whose answer ends with a token just picked
        for slot in picked:
            slot.unsent += self._pick(slot)
            if slot.next_token is None:
                ending.append(slot)
        if self._text_first:
            self._text(picked, ending)
            self._launch()
        else:
            self._launch()
            self._text(picked, ending)
            self._flush()
        for slot in self.slots:
            if slot.request and slot.request.cancelled.is_set() and not self._emit(slot):
                self._finish(slot, "cancelled")

    def _text(self, picked: list[_Slot], ending: list[_Slot]) -> None:
        """The picked tokens' text: an answer's first token and its last at once; those between,
        every TEXT_EVERY, for every slot at the same step (a server then hands its event loop one
        burst, not one a step)."""
        now = time.perf_counter()
        due = now - self._text_at >= TEXT_EVERY
        for slot in picked:
            if slot.request and (due or slot in ending or not slot.answer.sampled):
                self._emit(slot)
        if due:
            self._text_at = now

    def _flush(self) -> None:
        """Wake the consumers of the chunks emitted since the last flush (each once)."""
        for flush in {slot.request.flush for slot in self.slots if slot.request and slot.request.flush}:
            flush()

    def _launch(self) -> None:
        """One batch: each answering slot's next token (and the draft's guesses after it), then as
        much of the waiting prompts as fits, decoded; its outputs are read at the next step."""
        n = 0
        tokens, positions, n_seq_ids, seq_ids, outputs = self._batch.arrays

        def add(slot: _Slot, token: int, logits: bool) -> None:
            nonlocal n
            tokens[n] = token
            positions[n] = len(slot.tokens)
            n_seq_ids[n] = 1
            seq_ids[n][0] = slot.seq_id
            outputs[n] = logits
            slot.tokens.append(token)
            if logits:
                slot.batch_index = n
            n += 1

        for slot in self.slots:
            slot.batch_index = -1
        live = [slot for slot in self.slots if slot.request and not slot.request.cancelled.is_set()]
        for slot in live:  # answering slots first: one token each, and the draft's guesses after it
            if slot.next_token is not None:
                slot.drafts = self._guesses(slot, n)
                add(slot, slot.next_token, True)
                for guess in slot.drafts:
                    add(slot, guess, True)
                slot.batch_index -= len(slot.drafts)
                slot.next_token = None
        for slot in live:  # then as much of the waiting prompts as fits
            if slot.pending and n < self.n_batch:
                taken, slot.pending = slot.pending[:self.n_batch - n], slot.pending[self.n_batch - n:]
                for i, token in enumerate(taken, 1):
                    add(slot, token, i == len(taken) and not slot.pending)
                slot.request.read = len(slot.request.prompt) - len(slot.pending)
        self._flush()
        if n == 0:
            return
        status = self.ctx.decode_batch(self._batch, n)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} (the KV cache may be full)")

    def _guesses(self, slot: _Slot, n_in_batch: int) -> list[int]:
        """The draft's guesses after the token just sampled, as many as the batch, the sequence's
        context and the answer's remaining length have room for."""
        if self.drafter is None:
            return []
        room = min(self.drafter.draft_max, self.n_batch - n_in_batch - 1, self.n_ctx - len(slot.tokens) - 2,
                   slot.answer.limit - slot.answer.generated - len(slot.unsent) - 1)
        return self.drafter.propose(slot.seq_id, [*slot.tokens, slot.next_token], room)

    def _pick(self, slot: _Slot) -> list[tuple[int, TokenLogprob | None]]:
        """Sample at the slot's evaluated token, then at each of the draft's guesses while they
        equal what was sampled (the guesses not taken leave the cache). The last token sampled is
        the slot's next, unless it ends the answer whatever its text (end of generation, length)."""
        request, answer, drafts = slot.request, slot.answer, slot.drafts
        base = len(slot.tokens) - len(drafts) - 1  # the cache position of the token evaluated first
        answer.draft_tokens += len(drafts)
        top, picked, ends = request.sampling.logprobs, [], False
        for i in range(len(drafts) + 1):
            index = slot.batch_index + i
            token = self._sample_one(slot.sampler, index)
            picked.append((token, self._logprob(index, token, top) if top is not None else None))
            if slot.lazy is not None:
                self._watch(slot, token)
            guessed = i < len(drafts) and token == drafts[i]
            answer.draft_accepted += guessed
            ends = answer.ends(token, len(slot.unsent) + len(picked))  # those not yet text count too
            if ends or not guessed:
                break
        slot.drafts = []
        if base + len(picked) < len(slot.tokens):
            self.ctx.forget(slot.seq_id, base + len(picked))
            del slot.tokens[base + len(picked):]
        slot.next_token = None if ends else token
        return picked

    def _emit(self, slot: _Slot) -> bool:
        """The sampled tokens' text to the request, up to the one that ends the answer (a stop
        string in the text ends it here): whether it ended."""
        request, answer, unsent = slot.request, slot.answer, slot.unsent
        slot.unsent = []
        for token, logprob in unsent:
            chunk, ended = answer.add(token, logprob)
            if chunk:
                request.emit(chunk)
            if ended:
                self._finish(slot, ended)
                return True
        return False

    def _watch(self, slot: _Slot, token: int) -> None:
        """A lazy grammar (tool calls with tool_choice auto): the text is free until one of the
        triggers appears, and from then on the grammar holds. It starts only at a clean boundary
        (nothing but whitespace after the trigger): llama.cpp aborts the whole process when text it
        is made to replay does not fit a grammar, so a call begun mid-token is left free (and, if
        it is not valid, reaches the caller as text)."""
        tail = slot.lazy.see(self.model.piece(token))
        if tail is None:
            return
        slot.lazy = None
        if tail.strip():
            return
        try:
            sampler = self._make_sampler(replace(slot.request.sampling, grammar_triggers=()))
        except EdgeLLMError:
            return  # checked when the request came in; stay free rather than fail the answer
        self._free_sampler(slot)
        slot.sampler = sampler

    def _sample_one(self, sampler: Sampler | None, index: int) -> int:
        if sampler is not None:
            return self.ctx.sample(sampler, index)
        return int(self.ctx.logits_at(index).argmax())  # the first of equal maxima, as llama.cpp's greedy sampler

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        import numpy as np

        logits = self.ctx.logits_at(index).astype(np.float64)
        logp = logits - logits.max()
        logp -= np.log(np.exp(logp).sum())
        best = np.argsort(-logp)[:top] if top else []
        return TokenLogprob(
            token=token,
            text=self.model.piece(token).decode("utf-8", errors="replace"),
            logprob=float(logp[token]),
            top=tuple((int(t), self.model.piece(int(t)).decode("utf-8", errors="replace"), float(logp[t])) for t in best),
        )

    def _finish(self, slot: _Slot, reason: str) -> None:
        slot.request.emit(slot.answer.finish(reason))
        self._release(slot)

    def _release(self, slot: _Slot) -> None:
        slot.request = None
        slot.answer = None
        slot.pending = []
        slot.unsent = []
        slot.next_token = None
        slot.batch_index = -1  # a token still being decoded for it is not sampled for the next request
        slot.lazy = None
        self._free_sampler(slot)

    def _free_sampler(self, slot: _Slot) -> None:
        if slot.sampler:
            slot.sampler.close()
            slot.sampler = None

    # -- embeddings ------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> list[tuple[list[float], int]]:
        """Mean-pooled embeddings, one per text, with each text's token count. Every text is checked
        before any is computed, and the engine is held one text at a time, so answers being
        generated advance between them instead of waiting for the whole request."""
        import numpy as np

        batches = []
        for i, text in enumerate(texts):
            tokens = self.model.tokenize(text, add_special=True)
            if not tokens:
                raise UsageError(f"input {i}: cannot embed an empty text")
            if len(tokens) > self.n_ctx:
                raise UsageError(f"input {i}: the text is {len(tokens)} tokens, over the {self.n_ctx}-token context")
            batches.append(tokens)
        results = []
        for tokens in batches:
            with self.lock:
                if self._embed_ctx is None:
                    self._embed_ctx = self.model.context(
                        n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ctx, n_threads=self.n_threads,
                        embeddings=True,
                    )
                vector = self._embed_ctx.embedding(tokens)
            norm = float(np.linalg.norm(vector)) or 1.0
            results.append(((vector / norm).tolist(), len(tokens)))
        return results
