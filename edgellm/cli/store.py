"""``edgellm list | show | import | rm``: the model store from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgellm.gguf.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("list", aliases=["ls"], help="list the models in the store")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="show a model's GGUF metadata")
    p.add_argument("model", metavar="MODEL", help="store name or path to a .gguf file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--print-template", action="store_true", help="print the full chat template")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("import", help="add a GGUF file to the store")
    p.add_argument("file", type=Path, metavar="FILE.gguf")
    p.add_argument("--name", help="store name (default: from the file name)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("rm", aliases=["remove"], help="remove a model from the store")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.set_defaults(func=cmd_rm)


def _store():
    from edgellm.config import Settings
    from edgellm.models import store_for

    return store_for(Settings.resolve())


def cmd_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from edgellm.gguf.header import format_params, printable

    store = _store()
    count, reclaimed = store.clean_stale()
    if count:
        print(f"reclaimed {human_bytes(reclaimed)} left by {count} interrupted operation{'s' * (count > 1)}",
              file=sys.stderr)
    entries, broken = store.scan()
    if args.json:
        rows = [{**asdict(e.manifest), "name": e.name} for e in entries]
        print(json.dumps(rows + [{"name": name, "broken": why} for name, why in broken], indent=2))
        return 0
    if not entries and not broken:
        print("no models yet: `edgellm import FILE.gguf`, or `edgellm chat` for the bundled one")
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold")
    for column in ("NAME", "ARCH", "PARAMS", "QUANT", "SIZE", "CTX"):
        table.add_column(column, justify="right" if column in ("PARAMS", "SIZE", "CTX") else "left")
    for e in entries:
        m = e.manifest
        table.add_row(
            e.name,
            Text(printable(m.architecture)),
            format_params(m.parameters),
            Text(printable(m.quantization)),
            human_bytes(m.size),
            str(m.context_length or "-"),
        )
    for name, why in broken:
        table.add_row(name, Text(f"broken: {why} (`edgellm rm {name}` removes it)", style="red"))
    Console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.models import resolve

    model = resolve(args.model, Settings.resolve())
    info = model.header.summary()
    info["store_name"] = model.entry.name if model.entry else None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if args.print_template:
        print(info["chat_template"] or "")
        return 0
    _print_summary(model.name, info)
    return 0


def _print_summary(name: str, info: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from edgellm.gguf.header import printable

    def row(label: str, value: object) -> None:
        if value not in (None, "", []):
            facts.add_row(label, Text(printable(str(value))))  # model-provided: never markup, never escapes

    facts = Table(box=None, show_header=False, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column()
    row("name", info["name"] or name)
    row("file", info["path"])
    row("architecture", info["architecture"])
    row("parameters", f"{info['size_label']} ({info['parameters']:,})")
    row("quantization", info["quantization"])
    row("file size", human_bytes(info["file_size"]))
    row("context length", info["context_length"])
    row("layers", info["layers"])
    row("embedding size", info["embedding_length"])
    row("feed-forward size", info["feed_forward_length"])
    row("attention heads", info["heads"])
    row("KV heads", info["kv_heads"])
    row("sliding window", info["sliding_window"])
    row("vocabulary", f"{info['vocab_size']} tokens ({info['tokenizer']})")
    rope = info["rope"]
    rope_text = f"base {rope['freq_base']}" if rope["freq_base"] else None
    if rope_text and rope["dimension_count"]:
        rope_text += f", {rope['dimension_count']} dims"
    if rope_text and rope["scaling_type"]:
        rope_text += f", {rope['scaling_type']} scaling x{rope['scaling_factor']}"
    row("rope", rope_text)
    template = info["chat_template"]
    row(
        "chat template",
        f"yes ({len(template)} characters; --print-template prints it)" if template else "none (plain transcript fallback)",
    )
    console = Console()
    console.print(facts)
    types = Table(box=None, header_style="bold", title_justify="left")
    types.add_column("TENSOR TYPE")
    types.add_column("TENSORS", justify="right")
    types.add_column("SIZE", justify="right")
    for type_name, t in info["tensor_types"].items():
        types.add_row(type_name, str(t["tensors"]), human_bytes(t["bytes"]))
    console.print()
    console.print(types)


def cmd_import(args: argparse.Namespace) -> int:
    entry = _store().import_gguf(args.file, args.name)
    print(f"imported {entry.name} ({human_bytes(entry.manifest.size)}, {entry.manifest.quantization})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = _store()
    for name in args.models:  # all or nothing: check every name first (a damaged model may go too)
        if not store.exists(name):
            store.get(name)  # raises, naming the store's models
    from edgellm.workflows import remove_model

    for name in args.models:
        removed, cached = remove_model(store, name)
        print(f"removed {removed}" + (" and its copy in the Hugging Face cache" if cached else ""))
    return 0
