"""Speculative decoding: a small draft model proposes the next tokens, the target verifies them.

As llama.cpp's speculative decoding does it: the draft (same vocabulary) guesses up to ``draft_max``
tokens greedily, stopping early where its own top token is less likely than ``p_min``; the
target evaluates the sampled token and the guesses in one batch and samples at each position with
its own sampler, keeping guesses while they equal what it sampled. Every token is therefore drawn
from the target's distribution (the guesses only decide how many positions one decode computes):
greedy answers equal those without a draft, and a seeded answer draws the same random numbers.

The draft keeps one sequence per engine slot in its own KV cache, reused by common prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from edgellm.errors import EngineError, UsageError
from edgellm.runtime.native import NativeBatch, NativeContext, NativeModel
from edgellm.runtime.text import common_prefix

#: the draft's top token's probability is taken among this many likeliest (llama.cpp's draft top-k)
TOP_K = 10
#: most steps a draft sits out after declining to guess
MAX_REST = 8
#: llama.cpp's limits for a compatible draft: vocabulary sizes this close, token texts equal from here
MAX_VOCAB_DIFFERENCE = 128
CHECK_FROM_TOKEN = 5


class Drafter:
    """A loaded draft model and its context, with one cached sequence per slot of the engine."""

    def __init__(self, model: NativeModel, n_parallel: int, n_ctx: int, n_batch: int, n_threads: int,
                 draft_max: int, p_min: float) -> None:
        self.model = model
        self.draft_max = draft_max
        self.p_min = p_min
        self.n_batch = n_batch
        self.ctx: NativeContext = model.context(n_ctx=n_ctx * n_parallel, n_batch=n_batch, n_ubatch=min(512, n_batch),
                                                n_threads=n_threads, n_seq_max=n_parallel, swa_full=True,
                                                n_outputs=n_parallel)  # a decode reads its last token's logits only
        self._batch = NativeBatch(n_batch)
        self._cached: list[list[int]] = [[] for _ in range(n_parallel)]
        self._rest = [0] * n_parallel  # steps a sequence's draft sits out after declining to guess
        self._backoff = [0] * n_parallel

    def propose(self, seq_id: int, tokens: Sequence[int], n_max: int) -> list[int]:
        """Up to ``n_max`` guesses for what follows ``tokens`` (the sequence so far, ending with
        the token just sampled)."""
        import numpy as np

        if n_max <= 0:
            return []
        if self._rest[seq_id]:
            self._rest[seq_id] -= 1
            return []
        cached = self._cached[seq_id]
        keep = min(common_prefix(cached, tokens), len(tokens) - 1)  # the last token is evaluated for its logits
        self.ctx.forget(seq_id, keep)
        del cached[keep:]
        self._decode(seq_id, tokens[keep:])
        guesses: list[int] = []
        while True:
            logits = self.ctx.logits_at(-1)
            best = int(logits.argmax())
            top = np.partition(logits, -TOP_K)[-TOP_K:]  # its probability among the likeliest, as llama.cpp's draft sampler sees it
            if 1.0 / float(np.exp(top - logits[best]).sum()) < self.p_min:
                break
            guesses.append(best)
            if len(guesses) == n_max:
                break
            self._decode(seq_id, [best])
        # Unsure here: sit out the next 1, 2, 4, then 8 steps while it stays unsure. Catching up
        # later takes one decode for all the tokens missed, so a stretch the draft cannot guess
        # costs a fraction of a decode per token instead of one.
        self._backoff[seq_id] = 0 if guesses else min(2 * self._backoff[seq_id] or 1, MAX_REST)
        self._rest[seq_id] = self._backoff[seq_id]
        return guesses

    def _decode(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to the sequence's cache, in batches, with logits for the last one."""
        cached = self._cached[seq_id]
        token_at, pos, n_seq_ids, seq_ids, outputs = self._batch.arrays
        for start in range(0, len(tokens), self.n_batch):
            part = tokens[start : start + self.n_batch]
            for i, token in enumerate(part):
                token_at[i] = token
                pos[i] = len(cached) + i
                n_seq_ids[i] = 1
                seq_ids[i][0] = seq_id
                outputs[i] = start + i == len(tokens) - 1
            status = self.ctx.decode_batch(self._batch, len(part))
            if status != 0:
                raise EngineError(f"the draft model's llama_decode failed with status {status}")
            cached.extend(part)

    def close(self) -> None:
        self._batch.close()
        self.ctx.close()
        self.model.close()


def check_compatible(target: NativeModel, draft: NativeModel) -> None:
    """Refuse a draft whose tokens mean something else than the target's (llama.cpp's own test)."""
    why = target.vocabulary_difference(draft, CHECK_FROM_TOKEN, MAX_VOCAB_DIFFERENCE)
    if why is not None:
        raise UsageError(f"draft {draft.path.name} {why}")


def load_drafter(path: str | Path, target: NativeModel, n_parallel: int, n_ctx: int, n_batch: int, n_threads: int,
                 draft_max: int = 16, p_min: float = 0.75, n_gpu_layers: int = 0) -> Drafter:
    """Load a draft model for ``target``, checked to share its vocabulary."""
    draft = NativeModel(path, n_gpu_layers)
    try:
        check_compatible(target, draft)
        return Drafter(draft, n_parallel, n_ctx, n_batch, n_threads, draft_max, p_min)
    except BaseException:
        draft.close()
        raise
