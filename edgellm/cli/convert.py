"""``edgellm convert``: a Hugging Face checkpoint folder into a GGUF in the store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgellm.errors import UsageError
from edgellm.models.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face safetensors checkpoint to GGUF")
    p.add_argument("source", metavar="PATH_OR_NAME", help="checkpoint folder, or a checkpoint pulled into the store")
    p.add_argument("--outtype", default="auto", metavar="T",
                   help="f32, f16, bf16, q8_0 or auto (bf16 stays bf16, the rest f16)")
    p.add_argument("--name", help="store name (default: FOLDER-TYPE)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write this file instead of adding to the store")
    p.set_defaults(func=cmd_convert)


def checkpoint_folder(ref: str, settings) -> Path:
    """A checkpoint folder given by path, or by the name ``edgellm pull`` kept it under."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    kept = settings.checkpoints_dir / ref
    if "/" not in ref and kept.is_dir():
        return kept
    if path.is_file():
        raise UsageError(f"{ref} is a file; convert takes a checkpoint folder (config.json + *.safetensors)")
    raise UsageError(f"no checkpoint folder {ref}")


def progress_bar():
    """A bar over bytes written, with the tensor in hand and the time left."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                    transient=True, disable=not sys.stderr.isatty())


def cmd_convert(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.convert.core import convert, convert_to_store
    from edgellm.models import store_for

    settings = Settings.resolve()
    source = checkpoint_folder(args.source, settings)
    bar = progress_bar()
    task = bar.add_task("converting", total=None)

    def on_tensor(i: int, n: int, done: int, total: int, name: str) -> None:
        bar.update(task, completed=done, total=total, description=f"{i}/{n} {name}")

    options = dict(progress=on_tensor)
    with bar:
        if args.output:
            result, where = convert(source, args.output, args.outtype, name=args.name, **options), str(args.output)
        else:
            result, entry = convert_to_store(store_for(settings), source, args.outtype, name=args.name, **options)
            where = entry.name
    print(f"{where}: {result.arch}, {result.n_tensors} tensors, {result.outtype}, "
          f"{human_bytes(result.size)} in {result.seconds:.1f} s")
    return 0
