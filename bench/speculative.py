"""Speculative decoding's speed-up, acceptance rate and exactness, in one run.

The pair the issue names: SmolLM2-135M-Instruct converted to F16 is the model, its Q4_0 the draft
(same vocabulary, nearly the same answers). For each prompt, greedy answers of N tokens are
generated with and without the draft on the same loaded model (runs alternate); the script prints
tokens/s of each, their ratio, the draft's guesses the model kept, and in how many runs the two
greedy answers were identical token for token (every token is the model's own pick; a batch of
guesses rounds logits a little differently, which can flip a near-tie). A seeded sampled answer
(temperature 0.8) is compared the same way. Tried at llama.cpp's default confidence floor for the
draft (--draft-p-min 0.75) and a lower one.

usage: python bench/speculative.py [-n 128] [-r 3] [--draft-max 4,8,16] [--p-min 0.75,0.5] [-t THREADS]
       [--target F16.gguf --draft Q.gguf] [-ngl N]   (-ngl: the model's GPU layers; the draft's are planned)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

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


def main() -> None:
    from edgellm.options import LoadOptions, SamplingOptions
    from edgellm.runtime.engine import load_model
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--draft-max", default="4,8,16")
    ap.add_argument("--p-min", default="0.75,0.5", help="the draft's confidence floors to try (llama.cpp: 0.75)")
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--target", type=Path)
    ap.add_argument("--draft", type=Path)
    ap.add_argument("--gpu-layers", "-ngl", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = (args.target, args.draft) if args.target and args.draft else default_pair(Path(tmp))
        greedy = SamplingOptions(temperature=0.0, max_tokens=args.n)
        seeded = SamplingOptions(temperature=0.8, max_tokens=args.n, seed=1234)
        base = LoadOptions(n_ctx=2048, n_threads=args.threads, n_gpu_layers=args.gpu_layers)
        print(f"model {target.name}, draft {draft.name}, {args.n} tokens, {args.threads} threads, median of {args.r}")
        print(f"{'P-MIN':>5} {'MAX':>4} {'PROMPT':>6} {'ALONE T/S':>10} {'DRAFT T/S':>10} {'RATIO':>6} {'KEPT':>9} "
              f"{'GREEDY SAME':>11} {'SEEDED SAME':>11}")
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


if __name__ == "__main__":
    main()
