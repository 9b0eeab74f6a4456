"""``edgellm pull REPO[:QUANT]``: a GGUF from the Hugging Face Hub into the store."""

from __future__ import annotations

import argparse
import sys

from edgellm.cli.common import hardware_for, job_with_bar
from edgellm.errors import UsageError
from edgellm.gguf.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a model from the Hugging Face Hub (GGUF, or safetensors converted)")
    p.add_argument("ref", metavar="REPO[:QUANT]", help="for example bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    p.add_argument("--name", help="store name (default: REPO-QUANT)")
    p.add_argument("--quant", metavar="TYPE", help="for a safetensors repo: quantize to TYPE after converting")
    p.add_argument("--lora", action="append", default=[], metavar="ADAPTER_REPO",
                   help="for a safetensors repo: merge this PEFT adapter repo while converting (repeatable)")
    p.add_argument("--revision", help="a branch, tag or commit")
    p.add_argument("--plan", action="store_true", help="only read the remote header and say whether it fits")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("search", help="find GGUF repos on the Hugging Face Hub")
    p.add_argument("text", metavar="TEXT")
    p.add_argument("-n", "--limit", type=int, default=20, metavar="N")
    p.set_defaults(func=cmd_search)


def _fit_line(plan) -> str:
    return f"{'fits' if plan.fits else 'does not fit'}: {plan.summary() if plan.fits else plan.reason}"


def _pull_checkpoint(args: argparse.Namespace, settings, store, repo: str, listing, quant: str | None) -> int:
    """A safetensors repo: download what conversion needs, convert (merging adapters), quantize."""
    from edgellm.gguf.quant_types import quant_type
    from edgellm.workflows import plan_checkpoint, pull_and_convert

    size = sum(f.size for f in listing.checkpoint)
    target = quant_type(quant).name if quant else "F16"  # f16 and bf16 weigh the same
    plan = plan_checkpoint(repo, listing, store, hardware_for(settings), target)
    print(f"{repo} has no GGUF files: its safetensors checkpoint ({human_bytes(size)}) converts to "
          f"{target if quant else 'f16/bf16'}; {_fit_line(plan)}", file=sys.stderr)
    if args.plan:
        return 0 if plan.fits else 1
    result, entry, folder = job_with_bar(lambda job: pull_and_convert(
        repo, listing, store, settings.checkpoints_dir, job, quant=quant, lora=args.lora, name=args.name))
    print(f"pulled {entry.name} ({human_bytes(entry.manifest.size)}, {entry.manifest.quantization}; "
          f"converted in {result.seconds:.1f} s; the checkpoint stays as `{folder.name}` for `edgellm convert`)")
    from edgellm.cli.convert import say_source

    say_source(result, folder)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.models import store_for
    from edgellm.models.hub import list_repo, parse_ref
    from edgellm.workflows import plan_remote_gguf, pull_gguf

    settings = Settings.resolve()
    store = store_for(settings)
    repo, quant = parse_ref(args.ref)
    listing = list_repo(repo, args.revision, store)
    if listing.is_checkpoint:
        return _pull_checkpoint(args, settings, store, repo, listing, args.quant or quant)
    if args.quant or args.lora:
        raise UsageError("--quant and --lora apply to safetensors repos; for a GGUF repo write REPO:QUANT")
    choice, plan = plan_remote_gguf(args.ref, store, hardware_for(settings), args.revision)
    print(f"{choice.quant}: {human_bytes(choice.size)} in {len(choice.files)} file(s); {_fit_line(plan)}",
          file=sys.stderr)
    if args.plan:
        return 0 if plan.fits else 1

    def on_choice(chosen, was_default: bool) -> None:
        if was_default:
            print(f"no quantization given: picked {chosen.quant}", file=sys.stderr)

    entry = job_with_bar(lambda job: pull_gguf(args.ref, store, job, name=args.name, revision=args.revision,
                                               on_choice=on_choice))
    print(f"pulled {entry.name} ({human_bytes(entry.manifest.size)}, {entry.manifest.quantization})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.models import store_for
    from edgellm.models.hub import search

    hits = search(args.text, store_for(Settings.resolve()), args.limit)
    if not hits:
        print(f"no GGUF repos match {args.text!r}", file=sys.stderr)
        return 1
    width = max(len(h.repo) for h in hits)
    print(f"{'REPO':{width}}  {'DOWNLOADS':>10}  {'LIKES':>6}")
    for h in hits:
        print(f"{h.repo:{width}}  {h.downloads:>10,}  {h.likes:>6,}")
    return 0
