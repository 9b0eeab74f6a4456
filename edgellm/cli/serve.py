"""``edgellm serve``: the OpenAI-compatible HTTP API on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import sys

from edgellm.cli.common import add_model_options, hardware_for, read_template, settings_from_args
from edgellm.errors import UsageError
from edgellm.net import is_loopback


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")
    p.add_argument("model", nargs="?", metavar="MODEL", help="serve only this model (default: the whole store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--parallel", "-np", type=int, default=4, metavar="N", help="requests decoded together")
    p.add_argument("--api-key", help="require Authorization: Bearer KEY (or EDGELLM_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN", help="allow browser calls from ORIGIN")
    p.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a slot before 503")
    p.add_argument("--keep-alive", type=float, default=300, metavar="SECONDS", help="unload idle models after (-1: never)")
    p.add_argument("--alias", action="append", default=[], metavar="NAME=MODEL",
                   help="answer requests for NAME with MODEL (repeatable; *=MODEL for any name not served)")
    add_model_options(p)
    p.set_defaults(func=cmd_serve)


def _aliases(given: list[str]) -> dict[str, str]:
    aliases = {}
    for item in given:
        name, sep, model = item.partition("=")
        if not sep or not name.strip() or not model.strip():
            raise UsageError(f"--alias {item!r} is not NAME=MODEL", hint="for example --alias claude-haiku=qwen3-0.6b")
        aliases[name.strip()] = model.strip()
    return aliases


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from edgellm.server import ServerConfig, create_app
    from edgellm.server.models import ModelPool

    if args.parallel < 1:
        raise UsageError(f"--parallel must be positive, got {args.parallel}")
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be 1-65535, got {args.port}")
    settings = settings_from_args(args)
    loopback = is_loopback(args.host)
    if not loopback:
        print(f"warning: serving on {args.host}: anyone who can reach it can use your models"
              + ("" if (args.api_key or os.environ.get("EDGELLM_API_KEY")) else "; consider --api-key"), file=sys.stderr)
    pool = ModelPool(settings, args.model, args.parallel, args.keep_alive, hardware_for(settings), args.max_queue,
                     read_template(args), _aliases(args.alias))
    config = ServerConfig(
        api_key=args.api_key or os.environ.get("EDGELLM_API_KEY") or None,
        cors_origins=tuple(args.cors_origin),
        loopback_only=loopback,
        defaults=settings.sampling,
    )
    app = create_app(pool, config)
    print(f"edgellm serving {', '.join(pool.names()) or 'the (empty) store'} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=5, lifespan="off", server_header=False)
    finally:
        pool.close()
    return 0
