"""``edgellm worker``: lend this machine's CPU to another edgellm over llama.cpp's RPC protocol."""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from edgellm.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run an RPC worker that lends this machine's devices (llama.cpp RPC)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=50052)
    p.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    p.add_argument("--cache", type=Path, metavar="DIR", help="keep received tensors here, so reloads skip the network")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a non-loopback address: the RPC protocol has no authentication")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from edgellm.net import is_loopback
    from edgellm.system.hardware import physical_cores
    from edgellm.system.rpc import serve

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    if not is_loopback(args.host):
        if not args.allow_remote:
            raise UsageError(
                f"{args.host} is not a loopback address: anyone who reaches it could run code on this machine "
                "through llama.cpp's unauthenticated RPC protocol", hint="pass --allow-remote on a network you trust",
            )
        print(f"WARNING: listening on {args.host}:{args.port} with no authentication; only do this on a network "
              "you trust, behind a firewall", file=sys.stderr)
    threads = args.threads or physical_cores()
    print(f"edgellm worker on {args.host}:{args.port}, {threads} threads; use it with "
          f"--rpc {args.host}:{args.port}; Ctrl-C stops it", file=sys.stderr, flush=True)
    serve(args.host, args.port, threads, args.cache, threading.Event())
    return 0
