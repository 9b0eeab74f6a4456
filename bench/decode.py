"""Decode speed of edgellm's runtime (chat, run and the app: one sequence on the native engine)
against llama.cpp's own llama-bench tg, same model, threads and flash attention, in one run.

edgellm answers a chat prompt of P tokens with exactly N tokens (end-of-generation ignored), its
decode tokens/s measured over the tokens after the first, in a context of P + N tokens; llama-bench
runs tgN at depth P (``-d P``: the same P tokens in the KV cache first, and the same P + N context),
so both decode the same N positions: a token attends to every one before it, and P positions more
cost a small model a few percent. And the same runtime generating after a one-token prompt (BOS)
against llama-bench's plain tgN (depth 0). Runs alternate. Also times the real `edgellm run --json`
command, and the second turn of a chat against the first (the KV cache reused by common prefix).
Goal: edgellm / llama-bench >= 0.98.

usage: python bench/decode.py [MODEL.gguf] [-n 128] [-r 5] [-t THREADS] [-ngl N] [--llama-bench PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from _reference import reference_bin


def main() -> None:
    from edgellm.models.bundled import bundled_gguf
    from edgellm.options import LoadOptions, SamplingOptions
    from edgellm.runtime.loader import load_model
    from edgellm.runtime.templates import Message
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--llama-bench")
    ap.add_argument("--gpu-layers", "-ngl", type=int, default=0)
    args = ap.parse_args()
    path = args.model or str(bundled_gguf())
    bench = args.llama_bench or str(reference_bin() / "llama-bench")
    messages = [Message("user", "Tell me a long story about a lighthouse keeper.")]
    sampling = SamplingOptions(temperature=0.0, max_tokens=args.n, ignore_eos=True)

    def options(n_ctx: int) -> LoadOptions:
        return LoadOptions(n_ctx=n_ctx, n_threads=args.threads, flash_attn="on", n_gpu_layers=args.gpu_layers)

    with load_model(path, options(1024)) as model:
        prompt = model.tokenize(model.render(messages))
        depth, start = len(prompt), [model.native.bos if model.native.bos is not None else prompt[0]]
        first = list(model.chat([Message("system", "Fresh."), *messages], SamplingOptions(temperature=0, max_tokens=32)))
        answer = "".join(c.text for c in first)
        second = list(model.chat([Message("system", "Fresh."), *messages, Message("assistant", answer),
                                  Message("user", "And then?")], SamplingOptions(temperature=0, max_tokens=4)))

    ours_runs, theirs_runs, bare_runs, plain_runs = [], [], [], []
    bench_cmd = [bench, "-m", path, "-p", "0", "-n", str(args.n), "-d", f"{depth},0", "-r", "1", "-t", str(args.threads),
                 "-fa", "1", "-ngl", str(args.gpu_layers), "-o", "json"]
    with load_model(path, options(depth + args.n)) as model:
        list(model.chat(messages, SamplingOptions(temperature=0.0, max_tokens=16, ignore_eos=True)))  # warm-up
        for _ in range(args.r):
            # runs alternate with llama-bench's, so a busy neighbour slows both alike
            last = list(model.chat(messages, sampling))[-1]
            assert last.timings.generated_tokens == args.n and last.timings.prompt_tokens == depth, last
            ours_runs.append(last.timings.tokens_per_second)
            bare = list(model.generate(start, sampling))[-1]
            assert bare.timings.generated_tokens == args.n, bare
            bare_runs.append(bare.timings.tokens_per_second)
            ref = subprocess.run(bench_cmd, capture_output=True, text=True, check=True)
            at_depth, plain = json.loads(ref.stdout)
            theirs_runs.append(at_depth["avg_ts"])
            plain_runs.append(plain["avg_ts"])
    ours, theirs = statistics.median(ours_runs), statistics.median(theirs_runs)

    def paired(runs: list[float], reference: list[float]) -> float:
        return statistics.median(o / t for o, t in zip(runs, reference))

    print(f"model {Path(path).name}, {args.threads} threads, tg{args.n} after a {depth}-token chat prompt, {args.r} runs "
          "each, alternating, flash attention on")
    print(f"llama-bench tg{args.n} -d {depth}     : {theirs:7.1f} tok/s  {[round(x, 1) for x in theirs_runs]}")
    print(f"edgellm chat/run runtime   : {ours:7.1f} tok/s  {[round(x, 1) for x in ours_runs]}")
    print(f"ratio edgellm / llama-bench: {paired(ours_runs, theirs_runs):7.3f}   (median of paired runs; goal >= 0.98)")
    print(f"llama-bench tg{args.n} (depth 0)  : {statistics.median(plain_runs):7.1f} tok/s  "
          f"{[round(x, 1) for x in plain_runs]}")
    print(f"edgellm after BOS alone    : {statistics.median(bare_runs):7.1f} tok/s  {[round(x, 1) for x in bare_runs]}")
    print(f"ratio edgellm / llama-bench: {paired(bare_runs, plain_runs):7.3f}   (the same, at depth 0 and 1)")
    t1, t2 = first[-1].timings, second[-1].timings
    print(f"second turn: {t2.cached_tokens} of {t2.prompt_tokens} prompt tokens from the KV cache, "
          f"prompt {t2.prompt_ms:.0f} ms vs {t1.prompt_ms:.0f} ms for the first turn's {t1.prompt_tokens}")

    cli = subprocess.run(
        [sys.executable, "-m", "edgellm", "run", path, messages[0].content, "--json", "-n", str(args.n),
         "--temperature", "0", "--ctx", "1024", "-t", str(args.threads), "--flash-attn", "on",
         "--gpu-layers", str(args.gpu_layers)],
        capture_output=True, text=True, check=True,
    )
    timings = json.loads(cli.stdout)["timings"]
    print(f"`edgellm run --json`       : {timings['tokens_per_second']:7.1f} tok/s over {timings['generated_tokens']} "
          f"tokens (stops at end of generation; one run)")


if __name__ == "__main__":
    main()
