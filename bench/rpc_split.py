"""Local-only against split over two loopback RPC workers: tokens/s and bytes sent per token, in one run.

The same model, prompt, seed and token count run on the local CPU alone, then with every layer
spread over the two workers (each with one of the machine's threads). The bytes that cross the
"network" while answering (not while loading the weights) are what the loopback interface carried
in that time (its tx counter; nothing else talks over loopback during the run).

usage: python bench/rpc_split.py [MODEL.gguf] [-n 128] [--gpu-layers all]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (each packet once, TCP/IP headers included)."""
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def start_worker(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "edgellm", "worker", "--port", str(port), "-t", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    from edgellm.errors import EdgeLLMError
    from edgellm.system.rpc import hello

    for _ in range(100):
        try:
            hello(f"127.0.0.1:{port}", timeout=1)
            return proc
        except EdgeLLMError:
            time.sleep(0.2)
    sys.exit("worker did not start")


def generate(path: Path, options, n: int, on_loaded=lambda: None):
    """(timings, layers per device) of one greedy answer; ``on_loaded`` runs between load and answer."""
    from edgellm.options import SamplingOptions
    from edgellm.runtime.loader import load_model
    from edgellm.runtime.templates import Message

    with load_model(path, options) as model:
        on_loaded()
        chunks = list(model.chat([Message("user", "Write a story about a lighthouse keeper.")],
                                 SamplingOptions(temperature=0, max_tokens=n)))
        return chunks[-1].timings, model.load_options.split


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from edgellm.models.bundled import bundled_gguf
    from edgellm.options import LoadOptions

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()
    path = args.model or bundled_gguf()

    local, _ = generate(path, LoadOptions(n_ctx=1024, n_gpu_layers=0, n_threads=2), args.n)
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    workers = [start_worker(p) for p in ports]
    try:
        options = LoadOptions(n_ctx=1024, n_gpu_layers=-1, n_threads=2, tensor_split=(1.0, 1.0),
                              rpc=tuple(f"127.0.0.1:{p}" for p in ports))
        before = loopback_bytes()
        at_load: list[int] = []
        split_timings, split = generate(path, options, args.n, lambda: at_load.append(loopback_bytes()))
        answer_bytes = loopback_bytes() - at_load[0]
        load_bytes = at_load[0] - before
    finally:
        for w in workers:
            w.kill()
    tokens = max(split_timings.generated_tokens, 1)
    print(f"model: {path.name}, {args.n} tokens, 2 threads per side")
    print(f"layers per device: {' · '.join(f'{d} {n}' for d, n in split)}")
    print(f"local only        {local.tokens_per_second:7.1f} tok/s")
    print(f"two RPC workers   {split_timings.tokens_per_second:7.1f} tok/s   "
          f"ratio {split_timings.tokens_per_second / local.tokens_per_second:.3f}")
    print(f"loading moved {load_bytes / 2**20:.1f} MiB; the answer moved {answer_bytes / tokens / 1024:.1f} KiB per "
          f"token ({answer_bytes / 2**20:.2f} MiB for {tokens} tokens, prompt included)")


if __name__ == "__main__":
    main()
