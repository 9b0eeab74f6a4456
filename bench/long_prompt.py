"""A long prompt read by `edgellm serve` and by llama-server, side by side: what an agent app's first
request costs (Claude Code's is 20k tokens of system prompt and tools). Each server reads the same
prompt of N tokens from an empty cache (another prompt of the same length is read first, so the
second is not a prefix hit) with the same context, threads and flash attention; the time to the
first streamed byte and to the answer's first token are printed, and their ratio.

    python bench/long_prompt.py [--tokens 5000] [--ctx 8192] [--model GGUF] [--repeat 2]

llama-server holds a context to the model's trained length (8192 for SmolLM2), so a longer one
needs a model trained for it (Gemma 3: 32k).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._reference import edgellm_serve, free_port, llama_server, reference_bin, start  # noqa: E402


def prompt_of(tokens: int, seed: int) -> str:
    """A text of about ``tokens`` SmolLM2 tokens (each word below is about six), unique per seed."""
    return " ".join(f"{'abcdefgh'[seed % 8]}x{i % 997}" for i in range(tokens // 6))


def first_token(port: int, text: str) -> tuple[float, float, int]:
    """(seconds to the first byte, seconds to the first token, prompt tokens) of a streamed answer."""
    body = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 2,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start_at = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"port {port}: {response.status} {response.read()[:300]!r}")
    first_byte = first = None
    n_prompt = 0
    while True:
        line = response.readline()
        if not line:
            break
        first_byte = first_byte or time.perf_counter() - start_at
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if first is None and choices:  # each server's first event comes with the first token
                first = time.perf_counter() - start_at
            if event.get("usage"):
                n_prompt = event["usage"]["prompt_tokens"]
    return first_byte or 0.0, first or 0.0, n_prompt


def main() -> None:
    from edgellm.models.bundled import bundled_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=5000)
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--model", default=str(bundled_gguf()))
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    servers = {
        "edgellm": lambda port: (
            edgellm_serve(args.model, port, 1, args.ctx, args.threads) + ["--allow-long-context"]
        ),
        "llama-server": lambda port: llama_server(
            str(reference_bin() / "llama-server"), args.model, port, 1, args.ctx, args.threads
        ),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    for run in range(args.repeat):
        for name, command in servers.items():  # one server at a time: they would share the cores
            port = free_port()
            proc = start(command(port), f"http://127.0.0.1:{port}/health", dict(os.environ))
            try:
                first_token(port, prompt_of(args.tokens, 4 + run))  # the cache holds another prompt
                byte, token, n_prompt = first_token(port, prompt_of(args.tokens, run))
            finally:
                proc.terminate()
                proc.wait()
            results[name].append((byte, token))
            print(
                f"run {run + 1} {name:12s} {n_prompt} prompt tokens: first byte {byte:6.2f} s, "
                f"first token {token:6.2f} s ({n_prompt / max(token, 1e-9):.0f} tok/s)",
                flush=True,
            )
    ours = statistics.median(t for _, t in results["edgellm"])
    theirs = statistics.median(t for _, t in results["llama-server"])
    print(
        f"median first token: edgellm {ours:.2f} s, llama-server {theirs:.2f} s; "
        f"edgellm/llama-server {ours / theirs:.3f} (lower is faster)"
    )
    print(
        f"median first byte: edgellm {statistics.median(b for b, _ in results['edgellm']):.2f} s, "
        f"llama-server {statistics.median(b for b, _ in results['llama-server']):.2f} s"
    )


if __name__ == "__main__":
    main()
