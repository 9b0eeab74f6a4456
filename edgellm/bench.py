"""``edgellm bench``: llama-bench's measurements, made the same way, so the numbers mean the same.

For each combination of settings: a context sized n_prompt + n_gen, random token ids (BOS first
when the model adds one), one warm-up pass, the KV cache cleared before each repetition, the
prompt decoded in chunks of the batch size, generation as single-token decodes, and the figure
reported is the mean ± sample standard deviation of the per-repetition rates. Token ids are drawn
before the clock starts; nothing else runs inside the timed region but llama.cpp's decodes.

With a draft model, each generation test also runs as ``tgN+draft``: speculative decoding has
nothing to guess in random ids, so that row generates N tokens of real text (greedy, from a fixed
prompt, end-of-generation ignored) on the engine chat and serve use, and reports the share of the
draft's guesses the model kept.
"""

from __future__ import annotations

import itertools
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import UsageError
from edgellm.options import is_quantized_kv, kv_type

FLASH_ATTN_VALUES = {"0": "off", "off": "off", "1": "on", "on": "on", "auto": "auto"}


@dataclass(frozen=True)
class BenchCase:
    """One line of the result table: a model, a test (pp or tg) and the settings it ran with."""

    model: Path
    n_prompt: int
    n_gen: int
    n_threads: int
    n_gpu_layers: int
    type_k: str
    type_v: str
    flash_attn: str
    n_batch: int
    n_ubatch: int
    draft: Path | None = None  # speculative decoding with this draft model (a tg test on real text)
    draft_max: int = 16

    @property
    def test(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}" + ("+draft" if self.draft else "")


@dataclass(frozen=True)
class BenchResult:
    case: BenchCase
    model_type: str
    model_size: int
    model_n_params: int
    backend: str
    samples_ns: tuple[int, ...] = field(repr=False)
    draft_tokens: int = 0  # over all repetitions: guesses the draft made
    draft_accepted: int = 0  # and those the model kept

    @property
    def accepted(self) -> float | None:
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def n_tokens(self) -> int:
        return self.case.n_prompt + self.case.n_gen

    @property
    def samples_ts(self) -> list[float]:
        return [self.n_tokens * 1e9 / ns for ns in self.samples_ns]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.samples_ts)

    @property
    def stddev_ts(self) -> float:
        ts = self.samples_ts
        return statistics.stdev(ts) if len(ts) > 1 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The fields of llama-bench's JSON output that apply to edgellm."""
        c = self.case
        return {
            "model_filename": str(c.model),
            "model_type": self.model_type,
            "model_size": self.model_size,
            "model_n_params": self.model_n_params,
            "backends": self.backend,
            "n_batch": c.n_batch,
            "n_ubatch": c.n_ubatch,
            "n_threads": c.n_threads,
            "type_k": c.type_k,
            "type_v": c.type_v,
            "n_gpu_layers": c.n_gpu_layers,
            "flash_attn": c.flash_attn,
            "n_prompt": c.n_prompt,
            "n_gen": c.n_gen,
            "test": c.test,
            "avg_ns": int(statistics.fmean(self.samples_ns)),
            "stddev_ns": int(statistics.stdev(self.samples_ns)) if len(self.samples_ns) > 1 else 0,
            "avg_ts": round(self.avg_ts, 6),
            "stddev_ts": round(self.stddev_ts, 6),
            "samples_ns": list(self.samples_ns),
            "samples_ts": [round(x, 6) for x in self.samples_ts],
            **({"draft_filename": str(c.draft), "draft_max": c.draft_max, "draft_tokens": self.draft_tokens,
                "draft_accepted": self.draft_accepted} if c.draft else {}),
        }


def _positive(values: Sequence[int], what: str, allow_zero: bool = False) -> list[int]:
    for v in values:
        if v < 0 or (v == 0 and not allow_zero):
            raise UsageError(f"{what} must be {'>= 0' if allow_zero else 'positive'}, got {v}")
    return list(values)


def plan_cases(
    models: Sequence[Path],
    n_prompt: Sequence[int] = (512,),
    n_gen: Sequence[int] = (128,),
    threads: Sequence[int] = (),
    gpu_layers: Sequence[int] = (99,),
    kv_types: Sequence[str] = ("f16",),
    flash_attn: Sequence[str] = ("auto",),
    n_batch: int = 2048,
    n_ubatch: int = 512,
    draft: Path | None = None,
    draft_max: int = 16,
) -> list[BenchCase]:
    """Every combination, checked before anything runs (llama-bench's defaults otherwise); with
    ``draft``, every generation test once more with it."""
    from edgellm.system.hardware import physical_cores

    n_prompt = _positive(n_prompt, "prompt length (-p)", allow_zero=True)
    n_gen = _positive(n_gen, "generation length (-n)", allow_zero=True)
    threads = _positive(threads or [physical_cores()], "threads")
    _positive([n_batch], "batch size")
    _positive([n_ubatch], "micro-batch size")
    kv_pairs = []
    for spec in kv_types:
        k, _, v = spec.partition(":")
        kv_pairs.append((kv_type(k), kv_type(v or k)))
    modes = []
    for value in flash_attn:
        mode = FLASH_ATTN_VALUES.get(str(value).strip().lower())
        if mode is None:
            raise UsageError(f"unknown flash attention value {value!r}", hint="use 0, 1, on, off or auto")
        modes.append(mode)
    for (k, v), mode in itertools.product(kv_pairs, modes):
        if mode == "off" and is_quantized_kv(v):
            raise UsageError(
                f"a quantized V cache ({v}) needs flash attention, which --flash-attn 0 turns off",
                hint="drop that combination or use an f16 V cache",
            )
    tests = [(p, 0) for p in n_prompt if p] + [(0, g) for g in n_gen if g]
    if not tests:
        raise UsageError("nothing to measure: both -p and -n are 0")
    cases = []
    for model, ngl, (k, v), mode, t, (p, g) in itertools.product(
        models, gpu_layers, kv_pairs, modes, threads, tests
    ):
        cases.append(BenchCase(Path(model), p, g, t, ngl, k, v, mode, n_batch, n_ubatch))
        if draft is not None and g:
            cases.append(BenchCase(Path(model), p, g, t, ngl, k, v, mode, n_batch, n_ubatch, Path(draft), draft_max))
    return cases


def _timed_prompt(ctx, tokens: list[int], n_batch: int) -> int:
    start = time.perf_counter_ns()
    for i in range(0, len(tokens), n_batch):
        ctx.decode(tokens[i : i + n_batch])
    ctx.synchronize()
    return time.perf_counter_ns() - start


def _timed_gen(ctx, tokens: list[int]) -> int:
    decode, sync = ctx.decode, ctx.synchronize
    start = time.perf_counter_ns()
    for token in tokens:
        decode((token,))
        sync()
    return time.perf_counter_ns() - start


def _tokens(model, n: int, rng: random.Random) -> list[int]:
    """n random ids, BOS first when the model adds one (as llama-bench)."""
    ids = [rng.randrange(model.n_vocab) for _ in range(n)]
    if ids and model.bos is not None:
        ids[0] = model.bos
    return ids


def run_cases(
    cases: Sequence[BenchCase],
    repetitions: int = 5,
    on_case: Callable[[BenchCase], None] | None = None,
    seed: int = 1234,
) -> Iterator[BenchResult]:
    """Measure each case; a model is loaded once for all cases that share it and its GPU layers."""
    from edgellm.runtime.native import NativeModel
    from edgellm.system.devices import backend_label

    if repetitions < 1:
        raise UsageError(f"repetitions must be positive, got {repetitions}")
    backend = backend_label()
    rng = random.Random(seed)
    for (path, ngl), group in itertools.groupby(cases, key=lambda c: (c.model, c.n_gpu_layers)):
        with NativeModel(path, ngl) as model:
            for case in group:
                if on_case:
                    on_case(case)
                if case.draft:
                    samples, guessed, kept = _measure_drafted(model, case, repetitions)
                else:
                    samples, guessed, kept = _measure(model, case, repetitions, rng), 0, 0
                yield BenchResult(case, model.description, model.size, model.n_params, backend, tuple(samples),
                                  guessed, kept)


def _measure(model, case: BenchCase, repetitions: int, rng: random.Random) -> list[int]:
    with model.context(
        n_ctx=case.n_prompt + case.n_gen,
        n_batch=case.n_batch,
        n_ubatch=case.n_ubatch,
        n_threads=case.n_threads,
        type_k=case.type_k,
        type_v=case.type_v,
        flash_attn=case.flash_attn,
    ) as ctx:
        ctx.clear()
        # warm-up, as llama-bench: the whole prompt once, or one generated token
        if case.n_prompt:
            _timed_prompt(ctx, _tokens(model, case.n_prompt, rng), case.n_batch)
        else:
            _timed_gen(ctx, _tokens(model, 1, rng))
        samples = []
        for _ in range(repetitions):
            ctx.clear()
            if case.n_prompt:
                samples.append(_timed_prompt(ctx, _tokens(model, case.n_prompt, rng), case.n_batch))
            else:
                samples.append(_timed_gen(ctx, _tokens(model, case.n_gen, rng)))
        return samples


#: what a tgN+draft row generates from: prose a small model continues fluently
DRAFT_PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"


def _measure_drafted(model, case: BenchCase, repetitions: int) -> tuple[list[int], int, int]:
    """N tokens of greedy text through the engine with the draft: (ns per repetition, guesses, kept)."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.batch import BatchEngine, GenerationRequest
    from edgellm.runtime.native import ContextParams
    from edgellm.runtime.speculative import load_drafter

    prompt = model.tokenize(DRAFT_PROMPT, add_special=True)
    n_ctx = len(prompt) + case.n_gen + 1
    drafter = load_drafter(case.draft, model, 1, n_ctx, case.n_batch, case.n_threads, case.draft_max)
    params = ContextParams(n_ctx=n_ctx, n_batch=case.n_batch, n_threads=case.n_threads, type_k=case.type_k,
                           type_v=case.type_v, flash_attn=case.flash_attn)
    engine = BatchEngine(model, 1, params, threaded=False, drafter=drafter)
    sampling = SamplingOptions(temperature=0.0, max_tokens=case.n_gen, ignore_eos=True)
    samples, guessed, kept = [], 0, 0
    try:
        for rep in range(repetitions + 1):  # the first is the warm-up
            out: list = []
            engine.submit(GenerationRequest(prompt, sampling, out.append))
            while not (out and (isinstance(out[-1], BaseException) or out[-1].finish_reason)):
                engine.step()
            if isinstance(out[-1], BaseException):
                raise out[-1]
            timings = out[-1].timings
            if rep:
                samples.append(int(timings.generate_ms * 1e6 * case.n_gen / max(timings.decode_steps, 1)))
                guessed, kept = guessed + timings.draft_tokens, kept + timings.draft_accepted
    finally:
        engine.close()
    return samples, guessed, kept


def machine_info() -> dict[str, Any]:
    from edgellm.system.devices import devices

    found = devices()
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu_info": ", ".join(d.description for d in found if d.kind in ("cpu", "accel")),
        "cpu_cores": os.cpu_count(),
        "ram_bytes": ram,
        "gpu_info": ", ".join(d.description for d in found if d.kind in ("gpu", "igpu")),
        "devices": [{"name": d.name, "description": d.description, "kind": d.kind, "free": d.free, "total": d.total} for d in found],
        "os": platform.platform(),
    }


def build_info() -> dict[str, Any]:
    import importlib.metadata

    from edgellm import __version__
    from edgellm.system import ggml

    return {
        "edgellm": __version__,
        "llama_cpp_python": importlib.metadata.version("llama_cpp_python"),
        "system_info": ggml.system_info(),
        "gpu_offload": ggml.supports_gpu_offload(),
    }
