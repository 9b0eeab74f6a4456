"""``edgellm quantize``, ``edgellm imatrix`` and ``edgellm eval``: make smaller models, guided by
what matters in them, and measure what they lost."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.cli.common import job_with_bar, settings_from_args
from edgellm.errors import UsageError
from edgellm.gguf.header import human_bytes

if TYPE_CHECKING:
    from edgellm.imatrix import ImportanceMatrix


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model with llama.cpp's quantizer")
    p.add_argument("model", nargs="?", metavar="MODEL", help="store name or .gguf path")
    p.add_argument("type", nargs="?", metavar="TYPE", help="Q4_K_M, Q8_0, ... (see --list)")
    p.add_argument("--list", action="store_true", help="list the types with bits per weight")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write this file instead of adding to the store")
    p.add_argument("--name", help="store name (default: MODEL-TYPE)")
    p.add_argument("-t", "--threads", type=int, metavar="N")
    p.add_argument("--allow-requantize", action="store_true", help="allow quantizing an already quantized model")
    p.add_argument("--leave-output-tensor", action="store_true", help="keep output.weight unquantized")
    p.add_argument("--pure", action="store_true", help="every tensor in TYPE, no mixture")
    p.add_argument("--output-tensor-type", metavar="T", help="type for output.weight")
    p.add_argument("--token-embedding-type", metavar="T", help="type for token_embd.weight")
    p.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="type for the tensors whose name matches PATTERN, e.g. attn_v=q8_0 (repeatable)")
    p.add_argument("--imatrix", type=Path, metavar="FILE",
                   help="importance matrix (from `edgellm imatrix` or llama-imatrix); unlocks the IQ types")
    p.add_argument("--calibration", nargs="?", const="", metavar="TEXT",
                   help="make the importance matrix first, from TEXT (default: edgellm's calibration text)")
    p.add_argument("--sweep", metavar="T,...", help="quantize to each type and compare them (needs --text)")
    p.add_argument("--text", type=Path, metavar="FILE", help="text for --sweep's perplexity")
    p.add_argument("-c", "--ctx", type=int, default=512, metavar="N", help="context for --sweep's perplexity")
    p.add_argument("--chunks", type=int, metavar="N", help="evaluate at most N chunks of --text in --sweep")
    p.add_argument("--json", action="store_true", help="print --sweep's ladder as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("imatrix", help="compute an importance matrix for the IQ quantization types")
    p.add_argument("model", metavar="MODEL", help="store name or .gguf path (F16/BF16 is best)")
    p.add_argument("--text", type=Path, metavar="FILE", help="calibration text (default: edgellm's own)")
    p.add_argument("-c", "--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, metavar="N", help="use at most N chunks of the text")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="where to write it (default: MODEL.imatrix.gguf)")
    p.add_argument("--process-output", action="store_true", help="include output.weight, as llama-imatrix can")
    p.add_argument("-t", "--threads", type=int, metavar="N")
    p.add_argument("--gpu-layers", "-ngl", metavar="N|all|auto", help="layers to offload to the GPU (default auto)")
    p.set_defaults(func=cmd_imatrix)

    p = sub.add_parser("eval", help="perplexity of a model on a text, and KL divergence against a base")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--text", type=Path, required=True, metavar="FILE")
    p.add_argument("-c", "--ctx", type=int, default=512, metavar="N", help="tokens per chunk (default 512)")
    p.add_argument("--base", metavar="MODEL", help="compare token distributions against this model")
    p.add_argument("--chunks", type=int, metavar="N", help="evaluate at most N chunks")
    p.add_argument("-t", "--threads", type=int, metavar="N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def _print_types() -> None:
    from edgellm.gguf.quant_types import QUANT_TYPES

    print(f"{'TYPE':8} {'BITS/WEIGHT':>11}  NOTE")
    for t in QUANT_TYPES.values():
        note = t.note + ("  (needs an importance matrix)" if t.needs_imatrix else "")
        print(f"{t.name:8} {t.bpw:11.2f}  {note}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read text {path}: {getattr(exc, 'strerror', None) or exc}") from None


@contextmanager
def _resolve_model(ref: str) -> Iterator[tuple]:
    """(settings, model) for MODEL; a Hugging Face checkpoint folder is converted first, to a
    temporary GGUF in the store's folder that is gone once the quantized model is made."""
    from edgellm.config import Settings
    from edgellm.models import ResolvedModel, resolve, store_for
    from edgellm.workflows import gguf_of

    settings = Settings.resolve()
    path = Path(ref)
    if not path.is_dir():
        yield settings, resolve(ref, settings)
        return
    from edgellm.gguf.header import read_header

    print(f"converting {path} first", file=sys.stderr)
    with ExitStack() as temporary:  # entered under the bar, left once the quantized model is made
        name, gguf = job_with_bar(lambda job: temporary.enter_context(gguf_of(path, store_for(settings), job)))
        yield settings, ResolvedModel(name, gguf, read_header(gguf))


def _quantize_options(args: argparse.Namespace) -> dict:
    from edgellm.quantize import parse_tensor_type

    return {"threads": args.threads, "allow_requantize": args.allow_requantize,
            "leave_output_tensor": args.leave_output_tensor, "pure": args.pure,
            "output_tensor_type": args.output_tensor_type, "token_embedding_type": args.token_embedding_type,
            "tensor_types": [parse_tensor_type(t) for t in args.tensor_type]}


def _given_imatrix(args: argparse.Namespace, types: list) -> ImportanceMatrix | None:
    """--imatrix FILE, read once (a file that is not one is refused before anything is converted),
    after the refusals decided before any conversion or calibration starts."""
    from edgellm.quantize import require_imatrix

    if args.imatrix is not None and args.calibration is not None:
        raise UsageError("--imatrix and --calibration both give the importance matrix; pass one")
    for qtype in types:
        require_imatrix(qtype, args.imatrix is not None or args.calibration is not None)
    if args.imatrix is None:
        return None
    from edgellm.imatrix import load_imatrix

    return load_imatrix(args.imatrix)


def _imatrix_for(args: argparse.Namespace, settings, model,
                 given: ImportanceMatrix | None) -> ImportanceMatrix | None:
    """--imatrix FILE's matrix, or the one --calibration makes (kept in the store for reuse)."""
    from edgellm.models import store_for
    from edgellm.workflows import calibrated_imatrix

    if args.calibration is None:
        return given
    text = _read_text(Path(args.calibration)) if args.calibration else None
    print(f"measuring {model.name}'s activations on {args.calibration or 'the calibration text'}", file=sys.stderr)
    return job_with_bar(lambda job: calibrated_imatrix(
        store_for(settings), model.name, model.header, job, text=text, dataset=args.calibration,
        threads=args.threads))


def quantize_one(args: argparse.Namespace, settings, model, type_name: str,
                 imatrix: ImportanceMatrix | None):
    """Quantize MODEL to one type, into -o FILE or the store; return (result, store entry or None)."""
    from edgellm.gguf.quant_types import quant_type
    from edgellm.models import store_for
    from edgellm.workflows import quantize_file, quantize_into_store

    qtype = quant_type(type_name)
    options = {**_quantize_options(args), "imatrix": _imatrix_for(args, settings, model, imatrix)}

    def run(job):
        if args.output:
            return quantize_file(model.header, qtype, args.output, job, **options), None
        return quantize_into_store(store_for(settings), model.name, model.header, qtype, job, name=args.name,
                                   **options)

    return job_with_bar(run)


def cmd_quantize(args: argparse.Namespace) -> int:
    if args.list:
        _print_types()
        return 0
    if not args.model:
        raise UsageError("MODEL is missing", hint="edgellm quantize MODEL TYPE, or --list")
    if args.sweep:
        return _sweep(args)
    if not args.type:
        raise UsageError("TYPE is missing", hint="for example Q4_K_M; --list shows them all")
    from edgellm.gguf.quant_types import quant_type

    qtype = quant_type(args.type)
    imatrix = _given_imatrix(args, [qtype])
    _quantize_options(args)  # a bad --tensor-type is refused before anything is converted
    with _resolve_model(args.model) as (settings, model):
        if imatrix is not None:
            from edgellm.quantize import check_coverage

            check_coverage(model.header, imatrix)  # before the line that says it starts
        from edgellm.quantize import source_note

        if note := source_note(model.header, qtype):
            print(note, file=sys.stderr)
        print(
            f"quantizing {model.name} ({model.header.quantization}, {human_bytes(model.header.file_size)}) to {qtype.name}",
            file=sys.stderr,
        )
        result, entry = quantize_one(args, settings, model, args.type, imatrix)
    where = entry.name if entry else str(result.output)
    bpw = result.size_after * 8 / model.header.parameter_count
    print(
        f"{where}: {human_bytes(result.size_before)} -> {human_bytes(result.size_after)} "
        f"({bpw:.2f} bits/weight) in {result.seconds:.1f} s"
    )
    if result.fallbacks:
        print(result.fallback_summary(), file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from edgellm.gguf.quant_types import quant_type
    from edgellm.models import store_for
    from edgellm.workflows import sweep

    if not args.text:
        raise UsageError("--sweep needs --text FILE to measure perplexity on")
    if args.output:
        raise UsageError("--sweep writes one model per type into the store; -o does not apply")
    types = [quant_type(t) for t in args.sweep.split(",") if t.strip()]
    given = _given_imatrix(args, types)
    text = _read_text(args.text)
    options = {k: v for k, v in _quantize_options(args).items() if k != "threads"}
    with _resolve_model(args.model) as (settings, model):
        imatrix = _imatrix_for(args, settings, model, given)
        rows = job_with_bar(lambda job: sweep(store_for(settings), model.name, model.header, types, text, job,
                                              n_ctx=args.ctx, threads=args.threads, chunks=args.chunks,
                                              imatrix=imatrix, **options))
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
        return 0
    print(f"{'TYPE':10} {'IMATRIX':>7} {'SIZE':>10} {'BITS/W':>7} {'PPL':>9} {'KL':>8} {'TOP-1':>7} {'TG T/S':>8}")
    for row in rows:
        q = row.quality
        print(f"{row.quant if row.quant != 'base' else row.label:10} {'yes' if row.imatrix else '-':>7} "
              f"{human_bytes(row.size):>10} {row.bits_per_weight:7.2f} {q.perplexity:9.3f} {q.kl_mean:8.4f} "
              f"{q.top1_agreement:7.1%} {row.tokens_per_second:8.1f}")
    return 0


def cmd_imatrix(args: argparse.Namespace) -> int:
    from edgellm.imatrix import calibration_text, gpu_layers_for
    from edgellm.models import resolve
    from edgellm.workflows import make_imatrix

    text = _read_text(args.text) if args.text else calibration_text()
    settings = settings_from_args(args)
    model = resolve(args.model, settings)
    output = args.output or Path(f"{model.name}.imatrix.gguf")
    dataset = str(args.text) if args.text else "edgellm calibration text"
    layers = gpu_layers_for(model.header, args.ctx, settings.load.n_gpu_layers)
    matrix = job_with_bar(lambda job: make_imatrix(model.path, text, output, job, dataset=dataset, n_ctx=args.ctx,
                                                   chunks=args.chunks, threads=args.threads, n_gpu_layers=layers,
                                                   process_output=args.process_output))
    print(f"{output}: {len(matrix.sums)} weights, {matrix.chunk_count} chunks of {matrix.chunk_size} tokens "
          f"from {dataset}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.eval import evaluate
    from edgellm.models import resolve

    text = _read_text(args.text)
    settings = Settings.resolve()
    model = resolve(args.model, settings)
    base = resolve(args.base, settings) if args.base else None
    result = evaluate(model.path, text, args.ctx, base.path if base else None, args.threads, args.chunks)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(f"perplexity {result.perplexity:.4f} ± {result.perplexity_stderr:.4f} over {result.scored_tokens} tokens "
          f"({result.chunks} chunks of {result.n_ctx}, {result.seconds:.1f} s)")
    if base:
        print(f"against {base.name}: mean KL {result.kl_mean:.6f}, top-1 agreement {result.top1_agreement:.2%}")
    return 0
