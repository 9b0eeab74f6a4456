"""Speculative decoding's speed-up, acceptance rate and exactness, in one run.

The pair the issue names: SmolLM2-135M-Instruct converted to F16 is the model, its Q4_0 the draft
(same vocabulary, nearly the same answers). For each prompt, greedy answers of N tokens are
generated with and without the draft on the same loaded model (runs alternate); the script prints
tokens/s of each, their ratio, the share of the draft's guesses the model kept, and whether the
two answers are identical token for token (they must be: every token is the model's own pick).
A seeded sampled answer (temperature 0.8) is compared the same way.

usage: python bench/speculative.py [-n 128] [-r 3] [--draft-max 4,8,16] [-t THREADS] [--target F16.gguf --draft Q.gguf]
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
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--target", type=Path)
    ap.add_argument("--draft", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        target, draft = (args.target, args.draft) if args.target and args.draft else default_pair(Path(tmp))
        greedy = SamplingOptions(temperature=0.0, max_tokens=args.n)
        seeded = SamplingOptions(temperature=0.8, max_tokens=args.n, seed=1234)
        base = LoadOptions(n_ctx=2048, n_threads=args.threads, n_gpu_layers=0)
        print(f"model {target.name}, draft {draft.name}, {args.n} tokens, {args.threads} threads, median of {args.r}")
        print(f"{'DRAFT-MAX':>9} {'PROMPT':>6} {'ALONE T/S':>10} {'DRAFT T/S':>10} {'RATIO':>6} {'ACCEPTED':>9} "
              f"{'GREEDY SAME':>11} {'SEEDED SAME':>11}")
        with load_model(target, base) as alone:
            for draft_max in (int(x) for x in args.draft_max.split(",")):
                ratios, kept, guessed = [], 0, 0
                with load_model(target, replace(base, draft=str(draft), draft_max=draft_max)) as spec:
                    for p, prompt in enumerate(PROMPTS):
                        speeds: dict[str, list[float]] = {"alone": [], "draft": []}
                        same = True
                        for _ in range(args.r):
                            for key, model in (("alone", alone), ("draft", spec)):
                                tokens, timings = generate(model, prompt, greedy)
                                speeds[key].append(timings.tokens_per_second)
                                if key == "alone":
                                    reference = tokens
                                else:
                                    same = same and tokens == reference
                                    kept, guessed = kept + timings.draft_accepted, guessed + timings.draft_tokens
                        seeded_same = generate(alone, prompt, seeded)[0] == generate(spec, prompt, seeded)[0]
                        a, d = statistics.median(speeds["alone"]), statistics.median(speeds["draft"])
                        ratios.append(d / a)
                        rate = f"{kept / guessed:.0%}" if guessed else "-"
                        print(f"{draft_max:>9} {p:>6} {a:>10.1f} {d:>10.1f} {d / a:>6.2f} {rate:>9} {same!s:>11} "
                              f"{seeded_same!s:>11}")
                print(f"draft-max {draft_max}: speed-up {statistics.median(ratios):.2f}x (median over prompts), "
                      f"{kept}/{guessed} guesses kept ({kept / max(guessed, 1):.0%})")


if __name__ == "__main__":
    main()
