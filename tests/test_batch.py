"""The batch engine on its own: a request it cannot serve fails alone."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import BatchEngine, GenerationRequest
from edgellm.runtime.native import ContextParams, NativeModel


def test_a_grammar_llama_cpp_refuses_fails_only_its_request(smollm2: Path) -> None:
    with NativeModel(smollm2) as model:
        engine = BatchEngine(model, 2, ContextParams(256, n_threads=2))
        try:
            prompt = model.tokenize("The capital of France is", add_special=True)
            bad: queue.Queue = queue.Queue()
            engine.submit(GenerationRequest(prompt, SamplingOptions(temperature=0, max_tokens=4, grammar="root ::= ((("),
                                            bad.put))
            error = bad.get(timeout=30)
            assert isinstance(error, EdgeLLMError) and "grammar" in str(error)
            good: queue.Queue = queue.Queue()
            engine.submit(GenerationRequest(prompt, SamplingOptions(temperature=0, max_tokens=4), good.put))
            chunks = []
            while not (chunks and chunks[-1].finish_reason):
                chunks.append(good.get(timeout=30))
            assert "Paris" in "".join(c.text for c in chunks)
            assert chunks[-1].finish_reason == "length" and chunks[-1].timings.generated_tokens == 4
        finally:
            engine.close()


class _DecodeSpy:
    """The engine context's decode, recording at each call what the request's consumer had been
    handed by then: chunks emitted, and chunks it was woken for."""

    def __init__(self, decode, emitted: list, woken: list[int]) -> None:
        self._decode, self.emitted, self.woken, self.seen = decode, emitted, woken, []

    def __call__(self, batch, n_tokens: int) -> int:
        self.seen.append((len(self.emitted), self.woken[-1] if self.woken else 0))
        return self._decode(batch, n_tokens)


@pytest.mark.parametrize("text_first", [True, False], ids=["cpu", "gpu-order"])
def test_a_token_is_handed_over_before_or_beside_the_next_decode(smollm2: Path, text_first: bool) -> None:
    """On the CPU llama_decode returns when it is done: a sampled token's chunk is emitted before the
    next decode, and the consumer (the server's event loop) is woken then, with every chunk emitted
    so far, so its work runs while llama.cpp computes rather than between two decodes. With layers on
    a GPU (llama_decode returns at once) the text is made after the decode starts, and the consumer
    woken as soon as it is; either way no chunk waits for a later step's wake-up."""
    with NativeModel(smollm2) as model:
        engine = BatchEngine(model, 1, ContextParams(256, n_threads=2), threaded=False)
        engine._text_first = text_first  # the order a model with GPU layers gets, on this CPU
        try:
            emitted: list = []
            woken: list[int] = []
            spy = engine.ctx.decode_batch = _DecodeSpy(engine.ctx.decode_batch, emitted, woken)
            prompt = model.tokenize("The capital of France is", add_special=True)
            engine.submit(GenerationRequest(prompt, SamplingOptions(temperature=0, max_tokens=6), emitted.append,
                                            flush=lambda: woken.append(len(emitted))))
            while not (emitted and emitted[-1].finish_reason):
                engine.step()
            assert "Paris" in "".join(c.text for c in emitted)
            # the prompt's decode, then one per token after the first: the first token's chunk is out
            # (and its consumer woken) before the decode that follows it on the CPU, beside it on a GPU
            assert spy.seen[0] == (0, 0)
            assert (spy.seen[1][0] >= 1) if text_first else (spy.seen[1][0] == 0 and spy.seen[2][0] >= 1)
            assert all(n_emitted == n_woken for n_emitted, n_woken in spy.seen)
            assert len(spy.seen) == 6  # the prompt, then tokens 1-5; the sixth ends the answer undecoded
        finally:
            engine.close()


def test_the_engine_keeps_a_logits_row_a_sequence_as_the_planner_plans(smollm2: Path) -> None:
    """Like llama-server, the engine's context keeps room for the logits it reads (one row per
    sequence), not for a whole batch's: a fifth of the compute buffer a default context takes for
    SmolLM2's 49k vocabulary, and what the planner counts."""
    from edgellm.gguf.header import read_header
    from edgellm.plan.memory import ModelShape, engine_outputs, estimate
    from edgellm.system import llamalog

    def compute_mib(make) -> float:
        position = llamalog.mark()
        make().close()
        return llamalog.buffers_by_part(position)["compute.cpu"] / 2**20

    with NativeModel(smollm2) as model:
        engine = compute_mib(lambda: BatchEngine(model, 4, ContextParams(1024, n_batch=512, n_threads=2, flash_attn="on")))
        whole = compute_mib(lambda: model.context(n_ctx=4096, n_batch=512, n_seq_max=4, flash_attn="on", swa_full=True))
    planned = estimate(ModelShape.from_header(read_header(smollm2)), 4096, n_seq=4, n_outputs=engine_outputs(4))
    assert whole == 98.25  # 512 rows of 49152 logits, and two embedding-wide rows each
    assert engine < whole / 5
    assert planned.compute.cpu / 2**20 == pytest.approx(engine, rel=0.1)
