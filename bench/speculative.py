"""Speculative decoding's speed-up, acceptance rate and exactness, in one run.

The pair the issue names: SmolLM2-135M-Instruct converted to F16 is the model, its Q4_0 the draft
(same vocabulary, nearly the same answers). For each prompt, greedy answers of N tokens are
generated with and without the draft on the same loaded model (runs alternate); the script prints
tokens/s of each, their ratio, the draft's guesses the model kept, and in how many runs the two
greedy answers were identical token for token (every token is the model's own pick; a batch of
guesses rounds logits a little differently, which can flip a near-tie). A seeded sampled answer
(temperature 0.8) is compared the same way. Tried at edgellm's confidence floor for the draft
(--draft-p-min 0.75, llama.cpp's default once) and at llama-server's today (0), and at draft-max 3
(llama-server's default) to 16 (edgellm's).

The reference, in the same run: llama.cpp's own speculative decoding, llama-server with the same
draft (``-md --spec-type draft-simple``, the same draft-max and p-min) against llama-server alone,
on the same prompts: whether a draft pays on this machine at all, and edgellm's ratio beside it.

usage: python bench/speculative.py [-n 128] [-r 3] [--draft-max 3,8,16] [--p-min 0.75,0.0] [-t THREADS]
       [--target F16.gguf --draft Q.gguf] [-ngl N] [--llama-server PATH | --no-reference]
       (-ngl: the model's GPU layers; the draft's are planned)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import urllib.request
from dataclasses import replace
from pathlib import Path

from _reference import free_port, reference_bin, start

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a bicycle works, step by step.",
    "List ten facts about the Moon.",
    "Write a Python function that reverses a linked list, and explain it.",
]


def default_pair(folder: Path) -> tuple[Path, Path]:
    """SmolLM2 as a checkpoint (the bundled GGUF through transformers), converted to F16, and Q4_0."""
    sys.path.insert(0, str(ROOT))
    from edgellm.convert import convert
    from edgellm.gguf.header import read_header
    from edgellm.gguf.quant_types import quant_type
    from edgellm.models.bundled import bundled_gguf
    from edgellm.quantize import quantize
    from tests.hf_fixtures import hf_checkpoint

    target, draft = folder / "smollm2-f16.gguf", folder / "smollm2-q4_0.gguf"
    convert(hf_checkpoint(bundled_gguf(), "smollm2-135m-instruct"), target, "f16")
    quantize(read_header(target), quant_type("Q4_0"), draft)
    return target, draft


def generate(model, prompt: str, sampling) -> tuple[list[int], object]:
    from edgellm.runtime.templates import Message

    chunks = list(model.chat([Message("user", prompt)], sampling))
    return [c.token for c in chunks if c.token is not None], chunks[-1].timings


def llama_server_speeds(server: str, target: Path, extra: list[str], n: int, runs: int, threads: int, ngl: int
                        ) -> tuple[list[float], int, int]:
    """llama-server's decode tokens/s on each prompt (median of ``runs`` greedy answers of ``n``
    tokens, from its own timings), and the draft tokens it proposed and kept over all of them."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start([server, "-m", str(target), "--port", str(port), "-c", "2048", "-np", "1", "-t", str(threads),
                  "-ngl", str(ngl), *extra], base + "/health", dict(os.environ))
    speeds, drafted, kept = [], 0, 0
    try:
        for prompt in PROMPTS:
            runs_here = []
            for _ in range(runs):
                body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
                        "cache_prompt": False}
                req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    timings = json.load(resp)["timings"]
                runs_here.append(timings["predicted_per_second"])
                drafted += timings.get("draft_n", 0)
                kept += timings.get("draft_n_accepted", 0)
            speeds.append(statistics.median(runs_here))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return speeds, drafted, kept


def main() -> None:
    from edgellm.options import LoadOptions, SamplingOptions
    from edgellm.runtime.loader import load_model
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--draft-max", default="3,8,16", help="guesses at most per step (llama-server's default: 3)")
    ap.add_argument("--p-min", default="0.75,0.0", help="the draft's confidence floors to try (edgellm's default "
                    "0.75, llama-server's 0.0)")
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--target", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--llama-server", help="llama-server to compare with (default: the reference build)")
    ap.add_argument("--no-reference", action="store_true", help="leave llama-server's speculative decoding out")
    args = ap.parse_args()
    server = None if args.no_reference else args.llama_server or str(reference_bin() / "llama-server")
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = (args.target, args.draft) if args.target and args.draft else default_pair(Path(tmp))
        greedy = SamplingOptions(temperature=0.0, max_tokens=args.n)
        seeded = SamplingOptions(temperature=0.8, max_tokens=args.n, seed=1234)
        base = LoadOptions(n_ctx=2048, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
        print(f"model {target.name}, draft {draft.name}, {args.n} tokens, {args.threads} threads, median of {args.r}")
        print(f"{'P-MIN':>5} {'MAX':>4} {'PROMPT':>6} {'ALONE T/S':>10} {'DRAFT T/S':>10} {'RATIO':>6} {'KEPT':>9} "
              f"{'GREEDY SAME':>11} {'SEEDED SAME':>11}")
        alone_reference = None
        if server:
            alone_reference = llama_server_speeds(server, target, [], args.n, args.r, args.threads, args.gpu_layers)[0]
        with load_model(target, base) as alone:
            for p_min in (float(x) for x in args.p_min.split(",")):
                for draft_max in (int(x) for x in args.draft_max.split(",")):
                    options = replace(base, draft=str(draft), draft_max=draft_max, draft_p_min=p_min)
                    with load_model(target, options) as spec:
                        ratios, kept, guessed = [], 0, 0
                        for p, prompt in enumerate(PROMPTS):
                            speeds: dict[str, list[float]] = {"alone": [], "draft": []}
                            same, kept_here, guessed_here = 0, 0, 0
                            for _ in range(args.r):
                                reference, timings = generate(alone, prompt, greedy)
                                speeds["alone"].append(timings.tokens_per_second)
                                tokens, timings = generate(spec, prompt, greedy)
                                speeds["draft"].append(timings.tokens_per_second)
                                same += tokens == reference
                                kept_here += timings.draft_accepted
                                guessed_here += timings.draft_tokens
                            kept, guessed = kept + kept_here, guessed + guessed_here
                            seeded_same = generate(alone, prompt, seeded)[0] == generate(spec, prompt, seeded)[0]
                            a, d = statistics.median(speeds["alone"]), statistics.median(speeds["draft"])
                            ratios.append(d / a)
                            print(f"{p_min:>5} {draft_max:>4} {p:>6} {a:>10.1f} {d:>10.1f} {d / a:>6.2f} "
                                  f"{f'{kept_here}/{guessed_here}':>9} {f'{same}/{args.r}':>11} {seeded_same!s:>11}")
                    print(f"p-min {p_min}, draft-max {draft_max}: speed-up {statistics.median(ratios):.2f}x "
                          f"(median over prompts), {kept}/{guessed} guesses kept ({kept / max(guessed, 1):.0%})")
                    if server:
                        flags = ["-md", str(draft), "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_max),
                                 "--spec-draft-p-min", str(p_min), "-ngld", str(args.gpu_layers)]
                        speeds, drafted, taken = llama_server_speeds(server, target, flags, args.n, args.r,
                                                                     args.threads, args.gpu_layers)
                        ratio = statistics.median(d / a for d, a in zip(speeds, alone_reference))
                        print(f"  llama-server, the same draft and settings: speed-up {ratio:.2f}x "
                              f"({statistics.median(speeds):.1f} vs {statistics.median(alone_reference):.1f} tok/s "
                              f"alone), {taken}/{drafted} guesses kept ({taken / max(drafted, 1):.0%})")


if __name__ == "__main__":
    main()
