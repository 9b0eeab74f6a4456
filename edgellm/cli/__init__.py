"""The ``edgellm`` command: parse, call one library function, print.

Each command group lives in its own module with a ``register(subparsers)`` function; modules
import only argparse-level things at the top, so ``edgellm --help`` never loads llama.cpp,
numpy, transformers or textual.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from edgellm import __version__
from edgellm.errors import EdgeLLMError


def build_parser() -> argparse.ArgumentParser:
    from edgellm.cli import bench, chat, store

    parser = argparse.ArgumentParser(
        prog="edgellm",
        description="Run, chat with and manage local GGUF models on llama.cpp.",
        epilog="Set EDGELLM_DEBUG=1 to see tracebacks; EDGELLM_HOME moves every path.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chat.register(sub)
    store.register(sub)
    bench.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except EdgeLLMError as exc:
        if os.environ.get("EDGELLM_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`edgellm run ... | head`); not an error worth a word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("EDGELLM_DEBUG"):
            raise
        print(
            f"error: internal error: {type(exc).__name__}: {exc} (set EDGELLM_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1
