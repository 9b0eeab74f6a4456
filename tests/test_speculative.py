"""Speculative decoding: SmolLM2 F16 as the model, its Q4_1 (the bundled GGUF) as the draft.

The answers must be the model's own, token for token: greedy, and sampled with a seed, from the
CLI and from the server; a draft with another vocabulary is refused before anything is generated;
the planner leaves the draft its memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_server import Server

PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def target(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgellm.convert import convert

    return convert(smollm2_hf, tmp_path_factory.mktemp("spec") / "smollm2-f16.gguf", "f16").path


def _run(cli, model: Path, *args: str) -> dict:
    done = cli("run", str(model), "--json", "-n", "64", "--ctx", "1024", *args, PROMPT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_greedy_answers_with_a_draft_are_the_models_own(cli, target: Path, smollm2: Path) -> None:
    alone = _run(cli, target, "--temperature", "0")
    drafted = _run(cli, target, "--temperature", "0", "--draft", str(smollm2), "--draft-max", "8")
    assert drafted["response"] == alone["response"]
    assert drafted["completion_tokens"] == alone["completion_tokens"] == 64
    timings = drafted["timings"]
    assert timings["draft_tokens"] > 0 and 0 < timings["draft_accepted"] <= timings["draft_tokens"]
    assert alone["timings"]["draft_tokens"] == 0


def test_sampled_tokens_with_a_draft_follow_the_models_distribution(target: Path, smollm2: Path) -> None:
    """Each token of a seeded, sampled answer is drawn from the model's own probabilities at its
    position: its log-probability is the model's, evaluated without a draft. Token for token
    equality with the draftless answer is not promised: a batch of guesses rounds logits a little
    differently than one token at a time (about 0.005 in log-probability), which can flip a draw
    between two near-equal tokens."""
    import numpy as np

    from edgellm.options import LoadOptions, SamplingOptions
    from edgellm.runtime.loader import load_model
    from edgellm.runtime.native import NativeModel
    from edgellm.runtime.templates import Message

    sampling = SamplingOptions(temperature=0.8, seed=11, max_tokens=48, logprobs=0)
    messages = [Message("user", PROMPT)]
    with load_model(target, LoadOptions(n_ctx=1024, draft=str(smollm2), draft_max=8)) as model:
        prompt = model.tokenize(model.render(messages))
        chunks = list(model.chat(messages, sampling))
    assert chunks[-1].timings.draft_accepted > 0
    first = [c for c in chunks if c.token is not None]
    answer = [c.token for c in first]
    assert len(answer) == 48
    with NativeModel(target) as native, native.context(n_ctx=1024, n_batch=1024) as ctx:
        logits = ctx.logits([prompt + answer], len(prompt) - 1)[0][: len(answer)].astype(np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    reference = logp[np.arange(len(answer)), answer]
    reported = np.array([c.logprobs.logprob for c in first])
    assert np.abs(reported - reference).max() < 0.03


def test_a_draft_with_another_vocabulary_is_refused(cli, target: Path, gemma3: Path) -> None:
    done = cli("run", str(target), "--draft", str(gemma3), "-n", "4", PROMPT)
    assert done.returncode == 2
    assert done.stderr.startswith("error: draft gemma-3-270m-q4_k_m.gguf has another kind of tokenizer")
    assert len(done.stderr.splitlines()) == 1


def test_bad_draft_settings_are_one_line(cli, target: Path, tmp_path: Path) -> None:
    missing = cli("run", str(target), "--draft", str(tmp_path / "none.gguf"), PROMPT)
    assert missing.returncode == 1 and missing.stderr.startswith("error: no such file:")
    too_many = cli("run", str(target), "--draft", str(target), "--draft-max", "500", PROMPT)
    assert too_many.returncode == 2 and "draft max must be 1-64" in too_many.stderr


def test_the_planner_leaves_the_draft_its_memory(target: Path, smollm2: Path) -> None:
    """With RAM for the model's trained context alone, a draft beside it makes the planned context
    shorter, and model and draft together stay within the budget."""
    from edgellm.gguf.header import read_header
    from edgellm.options import LoadOptions
    from edgellm.plan.fit import MARGIN, draft_estimate, fit
    from edgellm.runtime.loader import resolve_load
    from edgellm.system.hardware import probe

    header, draft = read_header(target), read_header(smollm2)
    generous = probe(ram=8 << 30)
    ram = MARGIN + fit(header, generous, n_ctx=4096).memory.cpu + draft_estimate(draft, generous, 4096).cpu + (8 << 20)
    budget = probe(ram=ram)
    alone = resolve_load(header, LoadOptions(n_ctx=0), budget)
    drafted = resolve_load(header, LoadOptions(n_ctx=0, draft=str(smollm2)), budget)
    assert alone.n_ctx == 8192 and drafted.draft == smollm2 and 2048 < drafted.n_ctx < 8192
    together = drafted.plan.memory.cpu + draft_estimate(draft, budget, drafted.n_ctx).cpu
    assert together <= ram - MARGIN


def test_the_server_speculates_with_the_same_answers(target: Path, smollm2: Path, tmp_path: Path) -> None:
    ask = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 48}
    answers = []
    for extra in ((), ("--draft", str(smollm2))):
        server = Server(tmp_path / f"home{len(extra)}", target, "--parallel", "2", *extra)
        try:
            status, body, _ = server.raw("/v1/chat/completions", {"model": server.name, **ask})
            assert status == 200, body
            answers.append(body)
        finally:
            server.stop()
    alone, drafted = answers
    assert drafted["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
    assert drafted["timings"]["draft_accepted"] > 0 and alone["timings"]["draft_tokens"] == 0


def test_bench_measures_a_draft_beside_the_plain_generation(cli, target: Path, smollm2: Path) -> None:
    done = cli("bench", str(target), "-p", "0", "-n", "32", "-r", "1", "--draft", str(smollm2), "--draft-max", "4",
               "-o", "json")
    assert done.returncode == 0, done.stderr
    plain, drafted = json.loads(done.stdout)["results"]
    assert (plain["test"], drafted["test"]) == ("tg32", "tg32+draft")
    assert drafted["draft_filename"] == str(smollm2) and drafted["draft_max"] == 4
    assert 0 < drafted["draft_accepted"] <= drafted["draft_tokens"] and drafted["avg_ts"] > 0
    table = cli("bench", str(target), "-p", "0", "-n", "16", "-r", "1", "--draft", str(smollm2))
    header, *rows = table.stdout.splitlines()
    assert header.split()[-1] == "accepted" and rows[-1].split()[-1].endswith("%")


def test_every_guess_of_every_answer_in_one_step(target: Path, smollm2: Path) -> None:
    """A draft that always guesses its most (p_min 0) makes two answers decoded side by side read
    2 x (1 + draft_max) logits rows in one step: all the rows the engine's context keeps (llama.cpp
    aborts past them). Greedy answers stay the model's own."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.batch import BatchEngine, GenerationRequest
    from edgellm.runtime.native import ContextParams, NativeModel
    from edgellm.runtime.speculative import load_drafter

    sampling = SamplingOptions(temperature=0.0, max_tokens=24, ignore_eos=True)
    answers = []
    with NativeModel(target) as model:
        prompts = [model.tokenize(text, add_special=True) for text in (PROMPT, "The capital of France is")]
        for draft in (None, smollm2):
            drafter = draft and load_drafter(draft, model, 2, 256, 512, 2, draft_max=4, p_min=0.0)
            engine = BatchEngine(model, 2, ContextParams(256, n_batch=512, n_threads=2), threaded=False, drafter=drafter)
            try:
                outs: list[list] = [[], []]
                for prompt, out in zip(prompts, outs):
                    engine.submit(GenerationRequest(prompt, sampling, out.append))
                while not all(out and out[-1].finish_reason for out in outs):
                    engine.step()
                answers.append(["".join(c.text for c in out) for out in outs])
                timings = [out[-1].timings for out in outs]
            finally:
                engine.close()
    alone, drafted = answers
    assert drafted == alone and all(text.strip() for text in alone)
    assert all(t.generated_tokens == 24 for t in timings)
    # 24 tokens in steps of up to five (the token sampled and four guesses taken): four full guesses at least
    assert all(t.draft_tokens >= 16 for t in timings), timings
