"""``edgellm convert``: a Hugging Face checkpoint folder into a GGUF in the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from edgellm.cli.common import job_with_bar
from edgellm.errors import UsageError
from edgellm.gguf.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a Hugging Face safetensors checkpoint to GGUF")
    p.add_argument("source", metavar="PATH_OR_NAME", help="checkpoint folder, or a checkpoint pulled into the store")
    p.add_argument("--outtype", default="auto", metavar="T",
                   help="f32, f16, bf16, q8_0 or auto (bf16 stays bf16, the rest f16)")
    p.add_argument("--name", help="store name (default: FOLDER-TYPE)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write this file instead of adding to the store")
    p.add_argument("--lora", action="append", type=Path, default=[], metavar="ADAPTER_DIR",
                   help="merge this PEFT LoRA adapter while converting (repeatable)")
    p.add_argument("--from-base", nargs="?", const="auto", metavar="REPO_OR_DIR",
                   help="for a 4-bit checkpoint: convert the 16-bit one it was made from instead (default: the "
                        "one its model card names)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("merge", help="merge a PEFT LoRA adapter into a HF checkpoint, as a new HF checkpoint")
    p.add_argument("base", metavar="BASE", help="base checkpoint folder (or pulled checkpoint name)")
    p.add_argument("adapters", nargs="+", type=Path, metavar="ADAPTER_DIR")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="DIR", help="the new checkpoint folder")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("convert-lora", help="write a PEFT LoRA adapter as a GGUF LoRA for --lora at load time")
    p.add_argument("adapter", type=Path, metavar="ADAPTER_DIR")
    p.add_argument("--base", required=True, metavar="BASE", help="the base checkpoint folder it was trained on")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    p.add_argument("--outtype", default="f16", choices=("f16", "f32"))
    p.set_defaults(func=cmd_convert_lora)


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


def cmd_convert(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.convert.core import convert
    from edgellm.models import store_for
    from edgellm.workflows import convert_checkpoint

    settings = Settings.resolve()
    source = checkpoint_folder(args.source, settings)
    base = _base_instead(source, args.from_base) if args.from_base else None

    def run(job):
        nonlocal source
        if base is not None:
            from edgellm.workflows import fetch_checkpoint

            source = fetch_checkpoint(base, store_for(settings), settings.checkpoints_dir, job)
        if args.output:
            return convert(source, args.output, args.outtype, progress=job.tensors_of("convert"), lora=args.lora,
                           name=args.name, cancel=job.cancel), str(args.output)
        result, entry = convert_checkpoint(store_for(settings), source, job, outtype=args.outtype, name=args.name,
                                           lora=args.lora)
        return result, entry.name

    result, where = job_with_bar(run)
    print(f"{where}: {result.arch}, {result.n_tensors} tensors, {result.outtype}, "
          f"{human_bytes(result.size)} in {result.seconds:.1f} s")
    say_source(result, source)
    return 0


def say_source(result, folder: Path) -> None:
    """For a checkpoint stored quantized: what it was, and the 16-bit base it names, if any."""
    if not result.source:
        return
    from edgellm.convert.quantized import sixteen_bit_base

    print(f"dequantized from {result.source}: its quality is the ceiling of this file and of any "
          "quantization made from it")
    if named := sixteen_bit_base(folder):
        print(f"its model card names the 16-bit base {named}: `edgellm convert --from-base` converts that instead")


def _base_instead(source: Path, asked: str) -> str:
    """The 16-bit checkpoint to convert in place of a quantized one (``--from-base``): dequantized
    4-bit weights have lost what the 16-bit base still holds."""
    from edgellm.convert.checkpoint import read_config
    from edgellm.convert.quantized import schemes_for, sixteen_bit_base

    if not schemes_for(read_config(source)):  # none, or gpt-oss's MXFP4 (no 16-bit base)
        raise UsageError(f"{source} is not stored quantized; --from-base is for 4-bit and other quantized checkpoints")
    base = sixteen_bit_base(source) if asked == "auto" else asked
    if base is None:
        raise UsageError(f"{source} does not name the 16-bit checkpoint it was made from",
                         hint="give it: --from-base REPO_OR_FOLDER")
    print(f"converting {base}, the 16-bit base of {source.name}, instead of dequantizing it")
    return base


def cmd_merge(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.convert.lora import merge_checkpoint

    base = checkpoint_folder(args.base, Settings.resolve())
    result = job_with_bar(lambda job: merge_checkpoint(base, args.adapters, args.output,
                                                       progress=job.tensors_of("merge"), cancel=job.cancel))
    print(f"{result.path}: {result.arch}, {result.n_tensors} tensors, {human_bytes(result.size)} in {result.seconds:.1f} s")
    return 0


def cmd_convert_lora(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.convert.lora import convert_lora

    base = checkpoint_folder(args.base, Settings.resolve())
    result = job_with_bar(lambda job: convert_lora(args.adapter, base, args.output, args.outtype,
                                                   progress=job.tensors_of("write")))
    print(f"{result.path}: LoRA for {result.arch}, {result.n_tensors} tensors, {result.outtype}, "
          f"{human_bytes(result.size)} (use: edgellm chat MODEL --lora {result.path})")
    return 0
