"""Quantize speed against llama-quantize, and perplexity against llama-perplexity, in one run.

Input: an F16 GGUF (default: SmolLM2 dequantized from the shipped Q4_1 by llama.cpp's quantizer,
made in a temporary folder). Text: CPython's own documentation (pydoc_data.topics).
Goals: quantize time ratio <= 1.02; perplexities agree within 0.5%.

usage: python bench/compare_quantize.py [F16.gguf] [--types Q8_0,Q4_K_M] [-t THREADS] [-c 512] [--chunks 8]
       [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _reference import reference_bin


def main() -> None:
    from edgellm.eval import evaluate
    from edgellm.gguf.header import read_header
    from edgellm.gguf.quant_types import quant_type
    from edgellm.models.bundled import bundled_gguf
    from edgellm.quantize import quantize
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?")
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    src = Path(args.model) if args.model else work / "smollm2-f16.gguf"
    if not args.model:
        quantize(read_header(bundled_gguf()), quant_type("F16"), src, allow_requantize=True)
    import pydoc_data.topics

    text_path = work / "python-docs.txt"
    text_path.write_text("\n\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)))
    bin_dir = reference_bin()

    print(f"input {src.name}, {args.threads} threads")
    print(f"{'type':8} {'llama-quantize s':>17} {'quantize() s':>13} {'ratio':>6} {'`edgellm quantize` s':>21} {'ratio':>6}")
    outputs = {}
    for name in args.types.split(","):
        theirs_out, ours_out, cli_out = (work / f"{tag}-{name}.gguf" for tag in ("ref", "lib", "cli"))
        runs = {"ref": [], "lib": [], "cli": []}
        for _ in range(args.repeat):  # alternate, so neither side gets a warmer cache
            start = time.perf_counter()
            subprocess.run([str(bin_dir / "llama-quantize"), str(src), str(theirs_out), name, str(args.threads)],
                           check=True, capture_output=True)
            runs["ref"].append(time.perf_counter() - start)
            start = time.perf_counter()
            quantize(read_header(src), quant_type(name), ours_out, threads=args.threads)
            runs["lib"].append(time.perf_counter() - start)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "edgellm", "quantize", str(src), name, "-o", str(cli_out),
                            "-t", str(args.threads)], check=True, capture_output=True)
            runs["cli"].append(time.perf_counter() - start)
        theirs, ours, cli = (statistics.median(runs[k]) for k in ("ref", "lib", "cli"))
        same = theirs_out.read_bytes() == ours_out.read_bytes()
        print(f"{name:8} {theirs:17.2f} {ours:13.2f} {ours / theirs:6.3f} {cli:21.2f} {cli / theirs:6.3f}"
              f"   identical output: {same}")
        outputs[name] = ours_out

    print(f"\nperplexity, n_ctx {args.ctx}, {args.chunks} chunks")
    print(f"{'model':10} {'llama-perplexity':>17} {'edgellm eval':>13} {'diff':>8}")
    for name, path in [("F16", src), *outputs.items()]:
        ref = subprocess.run(
            [str(bin_dir / "llama-perplexity"), "-m", str(path), "-f", str(text_path), "-c", str(args.ctx),
             "--chunks", str(args.chunks), "-t", str(args.threads)],
            capture_output=True, text=True, check=True,
        )
        theirs = float(re.search(r"Final estimate: PPL = ([0-9.]+)", ref.stdout + ref.stderr).group(1))
        ours = evaluate(path, text_path.read_text(), args.ctx, threads=args.threads, max_chunks=args.chunks).perplexity
        print(f"{name:10} {theirs:17.4f} {ours:13.4f} {(ours / theirs - 1) * 100:7.3f}%")


if __name__ == "__main__":
    main()
