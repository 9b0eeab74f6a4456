"""Aggregate generation speed of `edgellm serve` with 1, 2, 4, 8 concurrent streams, against
llama.cpp's `llama-server --parallel N` and llama-cpp-python's own server, same model, threads and
lengths, in one run; and the time to first token of a conversation's second turn with and without
the prompt cache.

Whole runs (N streams of -n tokens, servers alternating run by run) vary ±7% on a shared machine even
between two identical servers, as the host's load shifts from second to second; so each stream count is
also measured in steady windows: the servers take turns every --window seconds, each turn N streams of
long answers, and a turn's rate counts the tokens that arrived once every stream was answering. Adjacent
turns share the host's mood, so their ratios are tight; the median of --windows pairs is printed with
its 95% confidence interval (ranks of the binomial, as for any median).

usage: python bench/serve_throughput.py [MODEL.gguf] [-n 128] [--streams 1,2,4,8] [-r 3] [-t THREADS]
       [--windows 20] [--window 2.5] [--gpu-layers N] [--llama-server PATH] [--vram] [--no-binding-server]
       (--vram: nvidia-smi's memory.used once loaded)
       (llama-cpp-python's server needs: pip install sse-starlette starlette-context pydantic-settings)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from _reference import edgellm_serve, free_port, llama_server, reference_bin, start


def vram_used() -> int:
    """MiB in use on the first NVIDIA GPU, by nvidia-smi."""
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def stream_once(base: str, body: dict) -> tuple[int, float, float]:
    """(completion tokens, seconds to first token, total seconds) of one streamed chat request."""
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as resp:
        for line in resp:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            for choice in data.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    tokens += 1
    return tokens, (first or time.perf_counter()) - start, time.perf_counter() - start


def steady_rate(base: str, streams: int, seconds: float, n_ctx: int) -> float:
    """Tokens/s while all ``streams`` answer at once: each streams one long answer for ``seconds``,
    and the tokens that arrived after the last stream's first token are counted (prompts and
    start-up left out). The connections then close, which ends the answers."""
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": n_ctx - 64, "temperature": 0.8, "ignore_eos": True, "stream": True}
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    deadline = time.perf_counter() + seconds

    def one(times: list[float]) -> None:
        req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            for line in resp:
                if line.startswith(b"data: {") and any((c.get("delta") or {}).get("content")
                                                        for c in json.loads(line[6:]).get("choices", [])):
                    times.append(time.perf_counter())
                if time.perf_counter() >= deadline:
                    return

    threads = [threading.Thread(target=one, args=(times,)) for times in arrivals]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(times[0] for times in arrivals if times) if all(arrivals) else deadline
    end = min(deadline, min(times[-1] for times in arrivals)) if all(arrivals) else deadline
    counted = sum(sum(start < t <= end for t in times) for times in arrivals)
    time.sleep(0.3)  # the server notices the closed connections and stops those answers
    return counted / (end - start) if end > start else float("nan")


def median_interval(values: list[float]) -> tuple[float, float, float]:
    """The median and its 95% confidence interval: the order statistics the binomial distribution
    puts around the middle (distribution-free)."""
    from math import comb

    xs, n = sorted(values), len(values)
    k = 0  # becomes the largest k with P(Binomial(n, 1/2) < k) <= 2.5%: the k-th smallest to the k-th largest
    while k + 1 < n and sum(comb(n, i) for i in range(k + 1)) / 2**n <= 0.025:
        k += 1
    return statistics.median(xs), xs[max(k - 1, 0)], xs[min(n - k, n - 1)]


def aggregate(base: str, streams: int, n: int) -> float:
    body = {"messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
            "max_tokens": n, "temperature": 0.8, "ignore_eos": True}
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(stream_once(base, body)[0])) for _ in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.perf_counter() - start)


def main() -> None:
    from edgellm.models.bundled import bundled_gguf
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("-r", type=int, default=3, help="alternating runs per server and stream count")
    ap.add_argument("--windows", type=int, default=20, help="steady windows per server and stream count (0: none)")
    ap.add_argument("--window", type=float, default=2.5, help="seconds a steady window lasts")
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    ap.add_argument("--gpu-layers", "-ngl", type=int, default=0)
    ap.add_argument("--llama-server", help="llama-server to compare with (default: the reference build)")
    ap.add_argument("--vram", action="store_true", help="print each server's VRAM use after loading")
    ap.add_argument("--no-binding-server", action="store_true", help="leave llama-cpp-python's own server out")
    args = ap.parse_args()
    binary = args.llama_server or str(reference_bin() / "llama-server")
    ngl = str(args.gpu_layers)
    model = args.model or str(bundled_gguf())
    counts = [int(x) for x in args.streams.split(",")]
    ctx = 1024
    env = dict(os.environ, PYTHONUNBUFFERED="1")

    def servers(n: int):
        port = free_port()
        yield "edgellm", port, edgellm_serve(model, port, n, ctx, args.threads, args.gpu_layers)
        port = free_port()
        yield "llama-server", port, llama_server(binary, model, port, n, ctx, args.threads, args.gpu_layers)
        if args.no_binding_server:
            return
        port = free_port()
        yield "llama_cpp.server", port, [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                                         "--n_ctx", str(ctx), "--n_threads", str(args.threads), "--flash_attn", "true"]

    table: dict[str, dict[int, float]] = {}
    ratios: dict[int, float] = {}
    spread: dict[int, list[float]] = {}  # each run's ratio, to show how far apart runs land
    steady: dict[int, tuple[float, float, float]] = {}  # steady windows' ratio: median, 95% interval
    for n in counts:
        running = {}
        try:
            for name, port, cmd in servers(n):  # side by side, idle while another is measured
                base = f"http://127.0.0.1:{port}"
                try:
                    running[name] = (base, start(cmd, base + ("/v1/models" if name == "llama_cpp.server" else "/health"),
                                                 env))
                except RuntimeError as exc:
                    print(f"{name}: skipped ({str(exc).strip().splitlines()[-1][:160]})", file=sys.stderr)
                    continue
                aggregate(base, 1, 8)  # warm-up
                if args.vram:
                    print(f"{name} --parallel {n}: {vram_used()} MiB of VRAM in use after loading", file=sys.stderr)
            runs: dict[str, list[float]] = {name: [] for name in running}
            for _ in range(args.r):  # alternating, so a busy neighbour slows every server alike
                for name, (base, _proc) in running.items():
                    runs[name].append(aggregate(base, n, args.n))
            pair = [name for name in ("edgellm", "llama-server") if name in running]
            if args.windows and len(pair) == 2:
                rates = {name: [] for name in pair}
                for i in range(args.windows):  # turns alternate, and so does who goes first
                    for name in pair[:: 1 if i % 2 == 0 else -1]:
                        rates[name].append(steady_rate(running[name][0], n, args.window, ctx))
                steady[n] = median_interval([a / b for a, b in zip(rates["edgellm"], rates["llama-server"])])
        finally:
            for _base, proc in running.values():
                proc.terminate()
                proc.wait(timeout=30)
        for name, values in runs.items():
            table.setdefault(name, {})[n] = statistics.median(values)
        if "edgellm" in runs and "llama-server" in runs:
            spread[n] = sorted(a / b for a, b in zip(runs["edgellm"], runs["llama-server"]))
            ratios[n] = statistics.median(spread[n])
    print(f"aggregate generated tokens/s, {args.n} tokens per stream, {args.threads} threads, model "
          f"{os.path.basename(model)}, median of {args.r} alternating runs")
    print(f"{'streams':>8} " + " ".join(f"{name:>17}" for name in table) + f" {'edgellm/llama-server':>21}")
    for n in counts:
        row = " ".join(f"{table[name].get(n, float('nan')):17.1f}" for name in table)
        runs_seen = " ".join(f"{r:.2f}" for r in spread.get(n, []))
        print(f"{n:>8} {row} {ratios.get(n, float('nan')):21.3f}   (runs: {runs_seen})")
    if steady:
        print(f"steady windows ({args.windows} per server, {args.window:g} s each, adjacent turns paired): "
              "edgellm/llama-server, median [95% interval]")
        for n, (mid, low, high) in steady.items():
            print(f"{n:>8} {mid:8.3f}  [{low:.3f}, {high:.3f}]")

    # time to first token of a second turn, with the first turn in the prompt cache and without
    system = "You are a careful assistant. " * 120
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Remember the word banana."}]
    turn2 = turn1 + [{"role": "assistant", "content": "I will remember it."}, {"role": "user", "content": "Which word?"}]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "edgellm", "serve", model, "--port", str(port), "--parallel", "1",
                  "--ctx", "2048", "-t", str(args.threads), "--gpu-layers", ngl], base + "/health", env)
    try:
        stream_once(base, {"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2})
        cold = stream_once(base, {"messages": turn2, "max_tokens": 4, "temperature": 0})[1]
        stream_once(base, {"messages": [{"role": "user", "content": "something else entirely"}], "max_tokens": 2})
        stream_once(base, {"messages": turn1, "max_tokens": 4, "temperature": 0})
        warm = stream_once(base, {"messages": turn2, "max_tokens": 4, "temperature": 0})[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"second turn, time to first token: {cold * 1000:.0f} ms without the prompt cache, "
          f"{warm * 1000:.0f} ms with it ({cold / warm:.1f}x faster)")


if __name__ == "__main__":
    main()
