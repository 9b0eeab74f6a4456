"""The planner against what llama.cpp allocates on this machine's GPU: every buffer at full, partial
and automatic offload, a `--gpu-memory` budget against what llama.cpp then allocates on the device,
and decode speed with every K/V cache type (llama-bench beside it when given).

usage: python bench/gpu_plan_check.py MODEL.gguf [--llama-bench PATH] [--ctx 4096]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MiB = 2**20


def loaded(path: str, ngl: int, op_offload: bool = True, **context) -> dict[str, int]:
    from edgellm.runtime.native import NativeModel
    from edgellm.system import llamalog

    llamalog.install()
    position = llamalog.mark()
    with NativeModel(path, ngl) as model, model.context(op_offload=op_offload, **context):
        return llamalog.buffers_by_part(position)


def compare(title: str, planned: dict[str, int], logged: dict[str, int]) -> None:
    print(f"\n{title}")
    print(f"  {'buffer':12} {'planned MiB':>12} {'llama.cpp MiB':>14} {'ratio':>7}")
    for part in sorted(set(logged) | {k for k, v in planned.items() if v}):
        ours, theirs = planned.get(part, 0), logged.get(part, 0)
        ratio = f"{ours / theirs:7.3f}" if theirs else "      -"
        print(f"  {part:12} {ours / MiB:12.2f} {theirs / MiB:14.2f} {ratio}")


# the cache types llama-bench's -ctk/-ctv parse (its ggml_type_from_name): it has no f32 cache
LLAMA_BENCH_KV = {"f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}


def main() -> None:
    from edgellm.gguf.header import read_header
    from edgellm.options import KV_TYPES
    from edgellm.plan.fit import MARGIN, fit
    from edgellm.system.hardware import physical_cores, probe

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--llama-bench")
    ap.add_argument("-n", type=int, default=64, help="tokens per K/V type decode test")
    args = ap.parse_args()
    header = read_header(args.model)
    hw = probe()
    if not hw.gpus:
        sys.exit("no GPU device in this llama.cpp build")
    threads = physical_cores()
    # as the runtime loads it for one conversation (the sliding-window layers' whole cache, one logits row)
    ctx_args = dict(n_ctx=args.ctx, n_batch=2048, n_ubatch=512, n_threads=threads, swa_full=True, n_outputs=1)
    half = int(header.arch_value("block_count")) // 2
    for title, budget, layers in (("full offload", None, -1), ("partial offload", None, half),
                                  ("auto offload", None, None), ("--gpu-memory 400MiB (auto)", 400 * MiB, None)):
        plan = fit(header, probe(gpu_memory=budget) if budget else hw, n_ctx=args.ctx, n_gpu_layers=layers)
        if not plan.fits:
            print(f"\n{title}: {plan.reason}")
            continue
        logged = loaded(args.model, plan.n_gpu_layers, plan.op_offload, flash_attn="on" if plan.flash_attn else "off",
                        type_k=plan.type_k, type_v=plan.type_v, **ctx_args)
        compare(f"{title}: {plan.summary()}", plan.memory.parts(), logged)
        if budget:
            used = sum(v for k, v in logged.items() if k.endswith(".gpu"))
            verdict = "respected" if used <= budget - MARGIN else "EXCEEDED"
            print(f"  device total {used / MiB:.1f} MiB for a budget of {budget / MiB:.0f} MiB less the "
                  f"{MARGIN / MiB:.0f} MiB margin: {verdict}")

    from edgellm.plan.fit import flash_attn_pairs
    from edgellm.plan.memory import ModelShape

    allowed = flash_attn_pairs(hw, ModelShape.from_header(header))
    pairs = [(t, t) for t in KV_TYPES] + [("q8_0", "q4_0"), ("f16", "q8_0")]
    print(f"\ndecode tg{args.n} tokens/s by K/V cache type, every layer on the GPU, flash attention on")
    print(f"  {'K/V':12} {'kernel':>7} {'edgellm':>9} {'llama-bench':>12} {'ratio':>7}")
    for k, v in pairs:
        flags = ["-p", "0", "-n", str(args.n), "-r", "2", "-ngl", "99", "-fa", "1", "-t", str(threads), "-o", "json"]
        ours = subprocess.run([sys.executable, "-m", "edgellm", "bench", args.model, *flags, "--kv-type", k if k == v else f"{k}:{v}"],
                              capture_output=True, text=True)
        mine = json.loads(ours.stdout)["results"][0]["avg_ts"] if ours.returncode == 0 else float("nan")
        theirs = float("nan")
        if args.llama_bench and {k, v} <= LLAMA_BENCH_KV:
            ref = subprocess.run([args.llama_bench, "-m", args.model, *flags, "-ctk", k, "-ctv", v],
                                 capture_output=True, text=True)
            theirs = json.loads(ref.stdout)[0]["avg_ts"] if ref.returncode == 0 else float("nan")
            if ref.returncode:
                print(f"  llama-bench {k}/{v}: exit {ref.returncode}: {ref.stderr.strip()[-300:]}")
        if ours.returncode:
            print(f"  edgellm bench {k}/{v}: exit {ours.returncode}: {ours.stderr.strip()[-300:]}")
        kernel = "yes" if allowed is None or (k, v) in allowed else "no"
        print(f"  {k + '/' + v:12} {kernel:>7} {mine:9.1f} {theirs:12.1f} {mine / theirs:7.3f}")


if __name__ == "__main__":
    main()
