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


def _tui(_args: argparse.Namespace) -> int:
    from edgellm.tui import make_app

    make_app().run()
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from edgellm.cli import bench, chat, convert, finetune, plan, pull, quantize, serve, store, worker

    parser = _Parser(
        prog="edgellm",
        description="Run, chat with and manage local GGUF models on llama.cpp.",
        epilog="Set EDGELLM_DEBUG=1 to see tracebacks; EDGELLM_HOME moves every path.",
    )
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("tui", help="the terminal app (also: edgellm with no command)").set_defaults(func=_tui)
    chat.register(sub)
    store.register(sub)
    pull.register(sub)
    convert.register(sub)
    quantize.register(sub)
    finetune.register(sub)
    plan.register(sub)
    serve.register(sub)
    bench.register(sub)
    worker.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # a prompt may come after options (`run MODEL -n 20 "the prompt"`); argparse would refuse it
    dest = getattr(args, "trailing_words", None)
    if extra and dest and not any(word.startswith("-") for word in extra):
        getattr(args, dest).extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        if not sys.stdout.isatty():
            parser.print_help()  # no terminal to draw the app on: say what the commands are instead
            return 0
        args.func = _tui
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
