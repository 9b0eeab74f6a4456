"""Decode speed of edgellm's runtime against raw llama-cpp-python, same model, prompt, threads, seed.

Both run in this one process, alternating, after a warm-up; each generates exactly N tokens
(end-of-generation ignored) from the same chat prompt, and decode tokens/s is measured the same
way for both: the tokens sampled after the first one over the time they took. Also times the
real `edgellm run --json` command in a subprocess. Goal: edgellm / raw >= 0.98.

usage: python bench/decode.py [MODEL.gguf] [-n 128] [-r 5] [-t THREADS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def raw_decode(llm, tokens: list[int], n: int) -> float:
    stamps = []
    for i, _ in enumerate(llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, reset=True)):
        stamps.append(time.perf_counter())
        if i + 1 >= n:
            break
    llm.reset()
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    from edgellm.models.bundled import bundled_gguf
    from edgellm.plan.hardware import physical_cores
    from edgellm.runtime.engine import load_model
    from edgellm.runtime.options import LoadOptions, SamplingOptions
    from edgellm.runtime.templates import Message

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    args = ap.parse_args()
    path = args.model or str(bundled_gguf())
    messages = [Message("user", "Tell me a long story about a lighthouse keeper.")]
    options = LoadOptions(n_ctx=1024, n_threads=args.threads, seed=42, flash_attn="on")
    sampling = SamplingOptions(temperature=0.0, max_tokens=args.n, ignore_eos=True)

    import llama_cpp

    model = load_model(path, options)
    tokens = model.tokenize(model.render(messages))
    raw = llama_cpp.Llama(
        path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads,
        flash_attn=True, seed=42, verbose=False,
    )
    ours_runs, raw_runs = [], []
    raw_decode(raw, tokens, 16)  # warm-up
    for _ in range(args.r):
        raw_runs.append(raw_decode(raw, tokens, args.n))
        model._llm.reset()  # same cold start as the raw run: no cached prompt
        last = list(model.chat(messages, sampling))[-1]
        assert last.timings.generated_tokens == args.n, last
        ours_runs.append(last.timings.tokens_per_second)
    raw_tps, ours_tps = statistics.median(raw_runs), statistics.median(ours_runs)
    print(f"model {path}, {args.threads} threads, {args.n} tokens, median of {args.r}")
    print(f"raw llama-cpp-python : {raw_tps:7.1f} tok/s  {[round(x, 1) for x in raw_runs]}")
    print(f"edgellm runtime      : {ours_tps:7.1f} tok/s  {[round(x, 1) for x in ours_runs]}")
    print(f"ratio edgellm / raw  : {ours_tps / raw_tps:7.3f}   goal >= 0.98")
    model.close()
    raw.close()

    cli = subprocess.run(
        [sys.executable, "-m", "edgellm", "run", path, messages[0].content, "--json", "-n", str(args.n),
         "--temperature", "0", "--ctx", "1024", "-t", str(args.threads), "--seed", "42", "--flash-attn", "on"],
        capture_output=True, text=True, check=True,
    )
    timings = json.loads(cli.stdout)["timings"]
    print(
        f"`edgellm run --json`  : {timings['tokens_per_second']:7.1f} tok/s over {timings['generated_tokens']} "
        f"tokens (stops at end of generation; one run)"
    )


if __name__ == "__main__":
    main()
