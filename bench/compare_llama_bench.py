"""edgellm bench against llama.cpp's own llama-bench: same model, tests and threads, in one run.

llama-bench is built from the llama.cpp sources vendored in the llama-cpp-python sdist of the
installed version (so both run the same llama.cpp), by ../shared/tools/llama-cpp-reference or a
path given with --llama-bench. Prints one row per test with both rates and their ratio.

usage: python bench/compare_llama_bench.py [MODEL ...] [-p 512] [-n 128] [-r 5] [-t THREADS]
       [--llama-bench PATH] [--extra "-fa 1 -ctk q8_0 -ctv q8_0"]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def llama_bench_path(explicit: str | None) -> Path:
    from _reference import reference_bin

    return Path(explicit) if explicit else reference_bin() / "llama-bench"


def by_test(rows: list[dict]) -> dict[tuple[str, str], float]:
    out = {}
    for row in rows:
        test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[(Path(row["model_filename"]).name, test)] = row["avg_ts"]
    return out


def run(cmd: list[str]) -> str:
    """A tool's stdout; its stderr's end and a non-zero exit when it fails."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{Path(cmd[0]).name} {' '.join(cmd[1:3])}... exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return done.stdout


def main() -> None:
    from edgellm.models.bundled import bundled_gguf
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="*")
    ap.add_argument("-p", default="512")
    ap.add_argument("-n", default="128")
    ap.add_argument("-r", default="5")
    ap.add_argument("-t", default=str(physical_cores()))
    ap.add_argument("--llama-bench")
    ap.add_argument("--extra", default="", help="extra llama-bench flags, passed to both (-fa, -ctk/-ctv, -ngl)")
    args = ap.parse_args()
    models = args.models or [str(bundled_gguf())]
    extra = args.extra.split()
    ours_extra = []
    it = iter(extra)
    for flag in it:  # map the llama-bench flags we share onto edgellm's
        value = next(it)
        ours_extra += {"-ctk": ["--kv-type", value], "-ctv": []}.get(flag, [flag, value])

    bench = llama_bench_path(args.llama_bench)
    common = ["-p", args.p, "-n", args.n, "-r", args.r, "-t", args.t]
    theirs, ours = {}, {}
    for model in models:
        theirs.update(by_test(json.loads(run([str(bench), "-m", model, *common, *extra, "-o", "json"]))))
        mine = run([sys.executable, "-m", "edgellm", "bench", model, *common, *ours_extra, "-o", "json"])
        ours.update(by_test(json.loads(mine)["results"]))
    print(f"{'model':40} {'test':>6} {'llama-bench':>12} {'edgellm':>10} {'ratio':>7}")
    for key in theirs:
        print(f"{key[0]:40} {key[1]:>6} {theirs[key]:12.2f} {ours[key]:10.2f} {ours[key] / theirs[key]:7.3f}")


if __name__ == "__main__":
    main()
