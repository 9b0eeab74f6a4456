"""``edgellm eval``: perplexity as llama-perplexity computes it, and KL divergence against a base.

The text is tokenized once (BOS first when the model adds one) and cut into chunks of n_ctx
tokens; each chunk is evaluated from an empty cache with its first token replaced by BOS, and
only the second half of each chunk is scored, so every scored token has at least n_ctx/2 tokens
of context. With a base model, both models see the same tokens, and we report the mean
KL(base || model) of their next-token distributions and how often their top tokens agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import UsageError

#: tokens per decode, as llama-perplexity's default batch (it packs n_batch / n_ctx chunks in one)
N_BATCH = 2048


@dataclass(frozen=True)
class EvalResult:
    model: str
    n_ctx: int
    chunks: int
    scored_tokens: int
    perplexity: float
    perplexity_stderr: float
    kl_mean: float | None
    top1_agreement: float | None
    seconds: float

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _log_softmax(logits):
    import numpy as np

    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def text_chunks(model, text: str, n_ctx: int, max_chunks: int | None, purpose: str) -> list[list[int]]:
    """The text cut as llama.cpp's perplexity and imatrix tools cut it: tokenized once (BOS first
    when the model adds one), chunks of ``n_ctx`` tokens, each starting with BOS in place of its
    first token, at most ``max_chunks``. ``purpose`` names what needs them when the text is short."""
    tokens = model.tokenize(text, add_special=True)
    if len(tokens) < 2 * n_ctx:
        raise UsageError(
            f"the text is {len(tokens)} tokens; {purpose} with a context of {n_ctx} needs at least {2 * n_ctx}",
            hint="use a longer text or a smaller --ctx",
        )
    n_chunks = len(tokens) // n_ctx
    if max_chunks:
        n_chunks = min(n_chunks, max_chunks)
    chunks = [tokens[c * n_ctx : (c + 1) * n_ctx] for c in range(n_chunks)]
    if model.bos is not None:
        for chunk in chunks:
            chunk[0] = model.bos
    return chunks


def evaluate(
    model_path: Path,
    text: str,
    n_ctx: int = 512,
    base_path: Path | None = None,
    threads: int | None = None,
    max_chunks: int | None = None,
    on_chunk: Callable[[int, int], None] | None = None,
) -> EvalResult:
    import numpy as np

    from edgellm.runtime.native import NativeModel
    from edgellm.system.hardware import physical_cores

    if n_ctx < 16:
        raise UsageError(f"--ctx must be at least 16 for perplexity, got {n_ctx}")
    threads = threads or physical_cores()
    start_time = time.perf_counter()
    with NativeModel(model_path) as model:
        chunks = text_chunks(model, text, n_ctx, max_chunks, "perplexity")
        n_chunks = len(chunks)
        base = NativeModel(base_path) if base_path else None
        try:
            if base is not None and base.n_vocab != model.n_vocab:
                raise UsageError(
                    f"the base has a vocabulary of {base.n_vocab} tokens and the model {model.n_vocab}; "
                    "they cannot be compared token by token"
                )
            first = n_ctx // 2
            # like llama-perplexity: as many chunks per decode as the batch holds (same numerics)
            n_seq = max(1, N_BATCH // n_ctx)
            nll_sum = nll2_sum = 0.0
            count = 0
            kl_sum = 0.0
            agree = 0
            ctx_args = dict(
                n_ctx=n_ctx * n_seq, n_batch=max(N_BATCH, n_ctx) if n_seq > 1 else n_ctx,
                n_ubatch=512, n_threads=threads, n_seq_max=n_seq,
            )
            with model.context(**ctx_args) as ctx, (base.context(**ctx_args) if base else nullcontext()) as base_ctx:
                for c0 in range(0, n_chunks, n_seq):
                    group = chunks[c0 : c0 + n_seq]
                    ctx.clear()
                    logits = ctx.logits(group, first)
                    if base is not None:
                        base_ctx.clear()
                        base_logits = base_ctx.logits(group, first)
                    for i, chunk in enumerate(group):
                        logp = _log_softmax(logits[i][:-1])  # position p predicts token p + 1
                        targets = np.asarray(chunk[first + 1 :])
                        nll = -logp[np.arange(len(targets)), targets]
                        nll_sum += float(nll.sum())
                        nll2_sum += float((nll**2).sum())
                        count += len(targets)
                        if base is not None:
                            base_logp = _log_softmax(base_logits[i][:-1])
                            kl_sum += float((np.exp(base_logp) * (base_logp - logp)).sum())
                            agree += int((base_logp.argmax(axis=1) == logp.argmax(axis=1)).sum())
                    if on_chunk:
                        on_chunk(c0 + len(group), n_chunks)
        finally:
            if base is not None:
                base.close()
    mean = nll_sum / count
    variance = max(nll2_sum / count - mean * mean, 0.0)
    ppl = math.exp(mean)
    return EvalResult(
        model=Path(model_path).name,
        n_ctx=n_ctx,
        chunks=n_chunks,
        scored_tokens=count,
        perplexity=ppl,
        perplexity_stderr=ppl * math.sqrt(variance / max(count - 1, 1)),
        kl_mean=kl_sum / count if base_path else None,
        top1_agreement=agree / count if base_path else None,
        seconds=time.perf_counter() - start_time,
    )
