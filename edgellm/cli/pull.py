"""``edgellm pull REPO[:QUANT]``: a GGUF from the Hugging Face Hub into the store."""

from __future__ import annotations

import argparse
import sys

from edgellm.cli.common import hardware_for
from edgellm.models.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a GGUF model from the Hugging Face Hub")
    p.add_argument("ref", metavar="REPO[:QUANT]", help="for example bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    p.add_argument("--name", help="store name (default: REPO-QUANT)")
    p.add_argument("--revision", help="a branch, tag or commit")
    p.add_argument("--plan", action="store_true", help="only read the remote header and say whether it fits")
    p.set_defaults(func=cmd_pull)


def _fit_line(header, settings) -> tuple[bool, str]:
    from edgellm.plan.fit import fit

    plan = fit(header, hardware_for(settings))
    return plan.fits, (plan.summary() if plan.fits else plan.reason)


def cmd_pull(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.models import store_for
    from edgellm.models.hub import pull, remote_header

    settings = Settings.resolve()
    store = store_for(settings)
    choice, header = remote_header(args.ref, store, args.revision)
    fits, line = _fit_line(header, settings)
    print(f"{choice.quant}: {human_bytes(choice.size)} in {len(choice.files)} file(s); "
          f"{'fits' if fits else 'does not fit'}: {line}", file=sys.stderr)
    if args.plan:
        return 0 if fits else 1

    def on_choice(chosen, was_default: bool) -> None:
        if was_default:
            print(f"no quantization given: picked {chosen.quant}", file=sys.stderr)

    entry = pull(args.ref, store, args.name, args.revision, on_choice)
    print(f"pulled {entry.name} ({human_bytes(entry.manifest.size)}, {entry.manifest.quantization})")
    return 0
