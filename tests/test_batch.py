"""The batch engine on its own: a request it cannot serve fails alone."""

from __future__ import annotations

import queue
from pathlib import Path

from edgellm.errors import EdgeLLMError
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import BatchEngine, GenerationRequest
from edgellm.runtime.native import NativeModel


def test_a_grammar_llama_cpp_refuses_fails_only_its_request(smollm2: Path) -> None:
    with NativeModel(smollm2) as model:
        engine = BatchEngine(model, 2, 256, 2)
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
