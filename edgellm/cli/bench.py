"""``edgellm bench``: llama-bench's tests and columns, through edgellm."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from edgellm.errors import UsageError
from edgellm.options import MAX_DRAFT

FORMATS = ("table", "md", "csv", "json")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _gpu_layer_list(text: str) -> list[int]:
    return [-1 if x.strip().lower() in ("auto", "all", "max") else int(x) for x in text.split(",") if x.strip()]


def _str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure prompt and generation speed, as llama-bench does")
    p.add_argument("models", nargs="+", metavar="MODEL", help="store names or .gguf paths")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], metavar="N,...", help="prompt lengths (0: none)")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], metavar="N,...", help="generation lengths (0: none)")
    p.add_argument("-r", "--repetitions", type=int, default=5, metavar="N")
    p.add_argument("-t", "--threads", type=_int_list, default=[], metavar="N,...", help="default: physical cores")
    p.add_argument("-ngl", "--gpu-layers", type=_gpu_layer_list, default=[99], metavar="N,...")
    p.add_argument("--kv-type", type=_str_list, default=["f16"], metavar="T,...", help="KV cache types; K:V for different ones")
    p.add_argument("-fa", "--flash-attn", type=_str_list, default=["auto"], metavar="0,1,auto")
    p.add_argument("-b", "--batch", type=int, default=2048, metavar="N")
    p.add_argument("-ub", "--ubatch", type=int, default=512, metavar="N")
    p.add_argument("-o", "--output", choices=FORMATS, default="table")
    p.add_argument("--sweep", action="store_true", help="also every quantization of each model in the store (NAME-TYPE)")
    p.add_argument("--draft", metavar="MODEL", help="also each tg test with speculative decoding by this draft model "
                   "(tgN+draft: real text, greedy, with the share of guesses kept)")
    p.add_argument("--draft-max", type=int, default=16, metavar="N", help="most tokens the draft guesses at a time")
    p.set_defaults(func=cmd_bench)


def _model_paths(refs: list[str], sweep: bool) -> list[Path]:
    from edgellm.config import Settings
    from edgellm.models import resolve, store_for

    settings = Settings.resolve()
    paths, names = [], []
    for ref in refs:
        model = resolve(ref, settings)
        paths.append(model.path)
        names.append(model.entry.name if model.entry else None)
    if sweep:
        from edgellm.gguf.quant_types import is_quant_suffix

        for name in filter(None, names):
            for entry in store_for(settings).list():
                suffix = entry.name.removeprefix(name + "-")
                if suffix != entry.name and is_quant_suffix(suffix) and entry.gguf_path not in paths:
                    paths.append(entry.gguf_path)
    return paths


def cmd_bench(args: argparse.Namespace) -> int:
    from edgellm.bench import plan_cases, run_cases

    paths = _model_paths(args.models, args.sweep)
    draft = _model_paths([args.draft], False)[0] if args.draft else None
    if not 1 <= args.draft_max <= MAX_DRAFT:
        raise UsageError(f"--draft-max must be 1-{MAX_DRAFT}, got {args.draft_max}")
    cases = plan_cases(
        paths, args.n_prompt, args.n_gen, args.threads, args.gpu_layers, args.kv_type, args.flash_attn,
        args.batch, args.ubatch, draft, args.draft_max,
    )
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        transient=True, disable=not sys.stderr.isatty(),
    ) as progress:
        task = progress.add_task("bench", total=len(cases))

        def on_case(case) -> None:
            progress.update(task, description=f"{case.model.name} {case.test}")

        for result in run_cases(cases, args.repetitions, on_case):
            results.append(result)
            progress.advance(task)
    print(render(results, args.output, args))
    return 0


def _columns(results, args) -> list[tuple[str, str]]:
    """llama-bench's columns: always model/size/params/backend/test/t/s, the rest when varied."""
    cols = [("model", "model_type"), ("size", "size"), ("params", "params"), ("backend", "backends")]
    if any(r.backend != "CPU" for r in results):
        cols.append(("ngl", "n_gpu_layers"))
    cols.append(("threads", "n_threads"))
    if args.batch != 2048:
        cols.append(("n_batch", "n_batch"))
    if args.ubatch != 512:
        cols.append(("n_ubatch", "n_ubatch"))
    if args.kv_type != ["f16"]:
        cols += [("type_k", "type_k"), ("type_v", "type_v")]
    if args.flash_attn != ["auto"]:
        cols.append(("fa", "flash_attn"))
    cols += [("test", "test"), ("t/s", "t/s")]
    if any(r.case.draft for r in results):
        cols.append(("accepted", "accepted"))
    return cols


def _cell(result, key: str) -> str:
    data = result.as_dict()
    if key == "size":
        return f"{result.model_size / 2**20:.2f} MiB"
    if key == "params":
        return f"{result.model_n_params / 1e6:.2f} M" if result.model_n_params < 1e9 else f"{result.model_n_params / 1e9:.2f} B"
    if key == "t/s":
        return f"{result.avg_ts:.2f} ± {result.stddev_ts:.2f}"
    if key == "accepted":
        return "" if result.accepted is None else f"{result.accepted:.0%}"
    return str(data[key])


def render(results, fmt: str, args) -> str:
    if fmt == "json":
        from edgellm.bench import build_info, machine_info

        return json.dumps(
            {"machine": machine_info(), "build": build_info(), "results": [r.as_dict() for r in results]}, indent=2
        )
    if fmt == "csv":
        out = io.StringIO()
        rows = [r.as_dict() for r in results]
        writer = csv.DictWriter(out, fieldnames=[k for k in rows[0] if k not in ("samples_ns", "samples_ts")], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    cols = _columns(results, args)
    rows = [[_cell(r, key) for _, key in cols] for r in results]
    if fmt == "md":
        right = {"size", "params", "threads", "ngl", "n_batch", "n_ubatch", "test", "t/s"}
        widths = [max(len(title), *(len(row[i]) for row in rows)) for i, (title, _) in enumerate(cols)]
        line = lambda cells: "| " + " | ".join(
            c.rjust(w) if t in right else c.ljust(w) for c, w, (t, _) in zip(cells, widths, cols)
        ) + " |"
        sep = "| " + " | ".join(("-" * (w - 1) + ":") if t in right else "-" * w for w, (t, _) in zip(widths, cols)) + " |"
        return "\n".join([line([t for t, _ in cols]), sep, *(line(row) for row in rows)])
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for title, _ in cols:
        table.add_column(title, justify="right" if title in ("size", "params", "t/s", "test", "threads", "ngl") else "left")
    for row in rows:
        table.add_row(*row)
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(table)
    return console.file.getvalue().rstrip("\n")
