"""Where a served step's time goes, edgellm serve against llama-server: each server's llama.cpp decode
calls are traced with uprobes (entry and return, to the microsecond) while the two take turns at steady
windows of N streams (bench/serve_throughput.py's), and each prints its median decode, its median gap
(from one decode's return to the next one's start: sampling, text, HTTP, everything not llama.cpp's
compute) and the step they make. The gap is work on the host's cores, so it is measured far more
tightly than tokens/s on a shared machine; the decode shows what the rest costs the compute running
beside it (an event loop or HTTP thread woken mid-decode takes a core from it).

Needs root and Linux perf with uprobes (``apt install linux-perf``); the probes are removed afterwards.

usage: python bench/serve_steps.py [MODEL.gguf] [--streams 1,2,4,8] [--windows 12] [--window 2.5] [-t THREADS]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

from _reference import edgellm_serve, free_port, llama_server, reference_bin, start
from serve_throughput import steady_rate

GROUP = "edgellm_bench"
#: the decode entry point each server calls: llama-server goes through llama_process in this llama.cpp
ENTRY = {"edgellm": "llama_decode", "llama-server": "llama_process"}


def libllama(name: str) -> Path:
    if name == "edgellm":
        import llama_cpp

        return Path(llama_cpp.__file__).parent / "lib" / "libllama.so"
    return reference_bin() / "libllama.so"


def perf(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["perf", *args], capture_output=True, text=True, check=False)


def add_probes() -> None:
    if shutil.which("perf") is None:
        sys.exit("serve_steps: Linux perf is not installed (apt install linux-perf)")
    perf("probe", "-d", f"{GROUP}:*")
    for name, function in ENTRY.items():
        tag = name.replace("-", "_")
        for spec in (f"{GROUP}:{tag}_in={function}", f"{GROUP}:{tag}_out={function}%return"):
            done = perf("probe", "-x", str(libllama(name)), "--add", spec)
            if done.returncode != 0:
                sys.exit(f"serve_steps: perf could not add a uprobe ({done.stderr.strip().splitlines()[-1]}); "
                         "this needs root and perf with uprobes")


def steps(trace: str, pid: int) -> tuple[list[float], list[float]]:
    """(decode durations, gaps) in seconds of one process's traced calls."""
    calls = [(float(t), kind) for p, t, kind in re.findall(r"^\s*(\d+)\s+([\d.]+):\s+\S+:\w+_(in|out)", trace, re.MULTILINE)
             if int(p) == pid]
    decodes, gaps = [], []
    for (t0, k0), (t1, k1), (t2, k2) in zip(calls, calls[1:], calls[2:]):
        if (k0, k1) == ("in", "out"):
            decodes.append(t1 - t0)
            if k2 == "in" and t2 - t1 < 0.05:  # not the pause between two windows
                gaps.append(t2 - t1)
    return decodes, gaps


def main() -> None:
    from edgellm.models.bundled import bundled_gguf
    from edgellm.system.hardware import physical_cores

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--windows", type=int, default=12, help="steady windows per server and stream count")
    ap.add_argument("--window", type=float, default=2.5)
    ap.add_argument("-t", "--threads", type=int, default=physical_cores())
    args = ap.parse_args()
    model, ctx = args.model or str(bundled_gguf()), 1024
    add_probes()
    print(f"per step, median over the steady windows ({args.windows} per server, {args.window:g} s each), "
          f"{args.threads} threads, {os.path.basename(model)}")
    print(f"{'streams':>8} {'server':>13} {'decode ms':>10} {'gap us':>7} {'step ms':>8} {'tok/s':>7}")
    try:
        for n in [int(x) for x in args.streams.split(",")]:
            running = {}
            try:
                for name, command in (("edgellm", edgellm_serve), ("llama-server", partial(
                        llama_server, str(reference_bin() / "llama-server")))):
                    port = free_port()
                    base = f"http://127.0.0.1:{port}"
                    running[name] = (base, start(command(model, port, n, ctx, args.threads), base + "/health",
                                                 dict(os.environ)))
                for base, _ in running.values():
                    steady_rate(base, n, 1.0, ctx)  # warm-up
                with tempfile.TemporaryDirectory() as tmp:
                    data = str(Path(tmp) / "perf.data")
                    recorder = subprocess.Popen(["perf", "record", "-a", "-e", f"{GROUP}:*", "-o", data],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    time.sleep(1)
                    for i in range(args.windows):
                        for name in list(running)[:: 1 if i % 2 == 0 else -1]:
                            steady_rate(running[name][0], n, args.window, ctx)
                    recorder.send_signal(2)
                    recorder.wait()
                    trace = perf("script", "-i", data, "-F", "pid,time,event").stdout
            finally:
                for _, proc in running.values():
                    proc.terminate()
                    proc.wait(timeout=30)
            made = {}
            for name, (_, proc) in running.items():
                decodes, gaps = steps(trace, proc.pid)
                decode, gap = statistics.median(decodes), statistics.median(gaps)
                made[name] = n / (decode + gap)
                print(f"{n:>8} {name:>13} {decode * 1e3:10.2f} {gap * 1e6:7.0f} {(decode + gap) * 1e3:8.2f} {made[name]:7.1f}")
            print(f"{n:>8} {'edgellm/llama-server':>30} {made['edgellm'] / made['llama-server']:.3f}")
    finally:
        perf("probe", "-d", f"{GROUP}:*")


if __name__ == "__main__":
    main()
