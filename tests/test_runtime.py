"""The runtime on the real SmolLM2: determinism, limits, stop strings, history, KV cache types."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from edgellm.errors import UsageError
from edgellm.gguf.header import read_header
from edgellm.options import LoadOptions, SamplingOptions
from edgellm.runtime.loader import load_model, resolve_load
from edgellm.runtime.templates import Message

GREEDY = SamplingOptions(temperature=0.0, max_tokens=24)
QUESTION = [Message("user", "What is the capital of Germany?")]


def answer(model, messages=QUESTION, sampling=GREEDY):
    chunks = list(model.chat(messages, sampling))
    assert all(c.finish_reason is None for c in chunks[:-1])
    return "".join(c.text for c in chunks), chunks[-1]


def test_answer_is_real_and_deterministic(model) -> None:
    first, last = answer(model)
    second, _ = answer(model)
    assert first == second
    assert "Berlin" in first
    assert last.timings.generated_tokens > 0
    assert last.timings.tokens_per_second > 0


def test_sampled_answer_is_deterministic_for_a_seed(smollm2: Path) -> None:
    sampling = SamplingOptions(temperature=1.0, max_tokens=16, seed=7)
    texts = []
    for _ in range(2):
        with load_model(smollm2, LoadOptions(n_ctx=512)) as m:
            texts.append(answer(m, sampling=sampling)[0])
    assert texts[0] == texts[1] and texts[0]


def test_max_tokens_ends_with_length(model) -> None:
    text, last = answer(model, sampling=replace(GREEDY, max_tokens=5))
    assert last.finish_reason == "length"
    assert last.timings.generated_tokens == 5
    assert len(model.tokenize(text, add_special=False)) in (4, 5, 6)


def test_stop_string_cuts_the_answer(model) -> None:
    full, _ = answer(model)
    cut_at = full.index("Berlin")
    text, last = answer(model, sampling=replace(GREEDY, stop=("Berlin",)))
    assert text == full[:cut_at]
    assert last.finish_reason == "stop"


def test_text_cut_by_a_stop_string_found_tokens_later_leaves_the_cache_exact(smollm2: Path) -> None:
    # a stop string is looked for when tokens become text, a few tokens after they were decoded:
    # the tokens past it leave the cache, and the next turn answers as a fresh model does
    with load_model(smollm2, LoadOptions(n_ctx=1024)) as m:
        cut, _ = answer(m, sampling=replace(GREEDY, stop=("Berlin",)))
        history = [*QUESTION, Message("assistant", cut + "Berlin."), Message("user", "And of France?")]
        second, last = answer(m, history)
        assert last.timings.cached_tokens > len(m.tokenize(m.render(QUESTION))) // 2
    with load_model(smollm2, LoadOptions(n_ctx=1024)) as fresh:
        assert answer(fresh, history)[0] == second and "Paris" in second


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """The longest end of the text that begins a stop string, found the slow way."""
    return next((text[i:] for i in range(len(text)) if any(s.startswith(text[i:]) for s in stops)), "")


@pytest.mark.parametrize("seed", range(4))
def test_stop_strings_are_found_across_pieces_and_false_starts_released(seed: int) -> None:
    import random

    from edgellm.runtime.text import StopScanner

    rng = random.Random(seed)
    for _ in range(500):
        stops = tuple({"".join(rng.choice("ab<|") for _ in range(rng.randint(1, 5)))
                       for _ in range(rng.randint(1, 3))})
        pieces = ["".join(rng.choice("ab<|\n") for _ in range(rng.randint(0, 4))) for _ in range(8)]
        scanner, shown, text = StopScanner(stops), "", ""
        for piece in pieces:
            text += piece
            out, stopped = scanner.feed(piece)
            shown += out
            found = [i for s in stops if (i := text.find(s)) >= 0]
            if found:  # the text is shown up to the first stop string, and the scanner says which
                assert stopped and shown == text[: min(found)] and text[min(found):].startswith(scanner.matched)
                break
            assert not stopped and shown + scanner.held == text
            assert scanner.held == _held_back(text, stops)


def test_end_of_generation_ends_with_stop(model) -> None:
    text, last = answer(model, sampling=replace(GREEDY, max_tokens=200))
    assert last.finish_reason == "stop"
    assert last.timings.generated_tokens < 200
    assert "<|im_end|>" not in text


def test_history_goes_through_the_template_and_reuses_the_cache(model) -> None:
    first_turn = [Message("user", "Remember the word banana.")]
    first, _ = answer(model, first_turn)
    history = [*first_turn, Message("assistant", first), Message("user", "What word did I ask you to remember?")]
    prompt = model.render(history)
    assert f"<|im_start|>assistant\n{first}<|im_end|>\n<|im_start|>user\nWhat word" in prompt
    second, last = answer(model, history)
    assert "banana" in second.lower()
    # the first turn is already in the KV cache: only the new turn is evaluated
    assert last.timings.cached_tokens >= len(model.tokenize(model.render(first_turn))) - 1
    assert last.timings.prompt_tokens == len(model.tokenize(prompt))
    # asked alone, the model has no banana to recall: the answer came from the history
    alone, _ = answer(model, history[-1:])
    assert "banana" not in alone.lower()


def test_cancel_stops_at_once(model) -> None:
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) >= 3

    chunks = list(model.chat(QUESTION, replace(GREEDY, max_tokens=100), cancel))
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].timings.generated_tokens == 3


def test_prompt_longer_than_the_context_is_refused(smollm2: Path) -> None:
    with load_model(smollm2, LoadOptions(n_ctx=64)) as m:
        with pytest.raises(UsageError, match="does not fit the 64-token context"):
            list(m.chat([Message("user", "word " * 100)], GREEDY))


@pytest.mark.parametrize(("type_k", "type_v", "flash"), [("f16", "f16", "off"), ("q8_0", "q8_0", "auto"), ("q4_0", "q4_0", "on")])
def test_kv_cache_types_load_and_answer(smollm2: Path, type_k: str, type_v: str, flash: str) -> None:
    with load_model(smollm2, LoadOptions(n_ctx=512, type_k=type_k, type_v=type_v, flash_attn=flash)) as m:
        assert (m.load_options.type_k, m.load_options.type_v) == (type_k, type_v)
        text, last = answer(m)
        assert "Berlin" in text and last.timings.generated_tokens > 0


def test_quantized_v_without_flash_attention_is_refused_before_loading(smollm2: Path) -> None:
    header = read_header(smollm2)
    with pytest.raises(UsageError, match=r"quantized V cache \(q4_0\) needs flash attention"):
        resolve_load(header, LoadOptions(type_v="q4_0", flash_attn="off"))
    assert resolve_load(header, LoadOptions(type_v="q4_0", flash_attn="auto")).flash_attn is True


def test_context_past_training_needs_the_flag(smollm2: Path) -> None:
    header = read_header(smollm2)
    with pytest.raises(UsageError, match="context 16384 is longer than the 8192 tokens"):
        resolve_load(header, LoadOptions(n_ctx=16384))
    assert resolve_load(header, LoadOptions(n_ctx=16384, allow_long_context=True)).n_ctx == 16384
    assert resolve_load(header, LoadOptions(n_ctx=0)).n_ctx == 8192
    assert resolve_load(header, LoadOptions()).n_ctx == 4096  # the default, under the trained length


def test_default_context_never_exceeds_the_trained_length(tmp_path: Path) -> None:
    from tests.ggufcraft import Craft

    path = tmp_path / "short.gguf"
    path.write_bytes(Craft().build())  # trained on 128 tokens
    assert resolve_load(read_header(path), LoadOptions()).n_ctx == 128


def test_raw_completion(model) -> None:
    chunks = list(model.complete("The capital of France is", replace(GREEDY, max_tokens=4)))
    assert "Paris" in "".join(c.text for c in chunks)


def test_multibyte_text_streams_whole(model) -> None:
    messages = [Message("user", "Write the word café three times.")]
    chunks = list(model.chat(messages, replace(GREEDY, max_tokens=40)))
    assert all("\ufffd" not in c.text for c in chunks)


def test_an_answer_fills_the_context_exactly_and_ends_with_length(smollm2: Path) -> None:
    # tokens become text a few at a time, but the length is counted on every token sampled: one
    # decoded past the context (llama.cpp makes it 256 cells) would fail the answer
    with load_model(smollm2, LoadOptions(n_ctx=256)) as m:
        prompt = len(m.tokenize(m.render(QUESTION)))
        _, last = answer(m, sampling=SamplingOptions(temperature=0.0, max_tokens=-1, ignore_eos=True))
        assert (last.finish_reason, last.timings.generated_tokens) == ("length", 256 - prompt)
