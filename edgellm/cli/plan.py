"""``edgellm plan`` (what a model will cost, and the choice auto-fit makes) and ``edgellm doctor``."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from edgellm.cli.common import hardware_for, settings_from_args
from edgellm.cli.finetune import add_train_options
from edgellm.gguf.header import human_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what a model costs in memory, and the settings that fit this machine")
    p.add_argument("model", metavar="MODEL", help="store name or .gguf path")
    p.add_argument("-c", "--ctx", metavar="N|auto", help="context per sequence (default: the runtime's default)")
    p.add_argument("--kv-type", metavar="K[,V]|auto", help="KV cache types (auto: step down only when needed)")
    p.add_argument("--gpu-layers", "-ngl", metavar="N|all|auto", default="auto")
    p.add_argument("--flash-attn", choices=("auto", "on", "off"))
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="sequences served at once")
    p.add_argument("--gpu-memory", metavar="SIZE", help="free VRAM to plan for instead of probing")
    p.add_argument("--ram", metavar="SIZE", help="free RAM to plan for instead of probing")
    p.add_argument("--json", action="store_true")
    train = p.add_argument_group("fine-tuning (with --finetune; MODEL is then a checkpoint folder or Hub repo)")
    train.add_argument("--finetune", action="store_true", help="plan a LoRA/QLoRA training run instead")
    add_train_options(train)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("doctor", help="what this machine and this llama.cpp build can do")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)


def cmd_plan(args: argparse.Namespace) -> int:
    if args.finetune:
        from edgellm.cli.finetune import cmd_plan_finetune

        args.base = args.model
        return cmd_plan_finetune(args)
    if args.batch is not None or args.qlora or args.max_len != 1024:
        from edgellm.errors import UsageError

        raise UsageError("--batch, --qlora and --max-len plan a training run: add --finetune")
    from edgellm.errors import UsageError
    from edgellm.models import resolve
    from edgellm.plan.fit import KV_LADDER, fit
    from edgellm.plan.memory import ModelShape, engine_outputs, estimate

    if args.parallel < 1:
        raise UsageError(f"--parallel must be positive, got {args.parallel}")
    settings = settings_from_args(args)
    model = resolve(args.model, settings)
    hw = hardware_for(settings)
    load = settings.load
    trained = model.header.context_length or 0
    ctx = load.n_ctx if load.n_ctx is not None else None
    if ctx and trained and ctx > trained and not load.allow_long_context:
        raise UsageError(f"context {ctx} is longer than the {trained} tokens the model was trained on")
    per_seq = ctx
    if ctx and args.parallel > 1:
        ctx = ctx * args.parallel
    plan = fit(model.header, hw, n_ctx=ctx, type_k=load.type_k, type_v=load.type_v,
               n_gpu_layers=load.n_gpu_layers, flash_attn=load.flash_attn, n_seq=args.parallel)
    shape = ModelShape.from_header(model.header)
    ladder = []  # the trade-off: each KV type at the planned context
    for k, v in KV_LADDER:
        est = estimate(shape, plan.n_ctx, k, v, True, plan.n_gpu_layers, n_seq=args.parallel,
                       has_gpu=bool(hw.gpus and hw.gpu_offload), op_offload=plan.op_offload,
                       n_outputs=engine_outputs(args.parallel))
        ladder.append({"type_k": k, "type_v": v, "kv_bytes": est.kv.total, "ram": est.cpu, "vram": est.gpu})
    m = plan.memory
    data = {
        "model": model.name,
        "fits": plan.fits,
        "reason": plan.reason,
        "n_ctx": plan.n_ctx,
        "n_ctx_per_sequence": (plan.n_ctx // args.parallel) if per_seq is None else per_seq,
        "parallel": args.parallel,
        "type_k": plan.type_k,
        "type_v": plan.type_v,
        "flash_attn": plan.flash_attn,
        "n_gpu_layers": plan.n_gpu_layers,
        "n_layers": shape.n_layer,
        "parameters": plan.parameters,
        "active_parameters": plan.active_parameters,
        "op_offload": plan.op_offload,
        "weights": asdict(m.weights),
        "kv_cache": asdict(m.kv),
        "compute": asdict(m.compute),
        "output": m.output,
        "ram": m.cpu,
        "vram": m.gpu,
        "ram_budget": plan.ram_budget,
        "vram_budget": plan.gpu_budget,
        "kv_types": ladder,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0 if plan.fits else 1
    _print_plan({**data, "experts": plan.experts_note()})
    return 0 if plan.fits else 1


def _print_plan(d: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    where = "CPU only" if d["n_gpu_layers"] == 0 else f"{d['n_gpu_layers']} of {d['n_layers'] + 1} layers (with output) on the GPU"
    console.print(
        f"[bold]{d['model']}[/bold]: ctx {d['n_ctx']} · KV {d['type_k']}/{d['type_v']} · "
        f"flash attention {'on' if d['flash_attn'] else 'off'} · {where}{d['experts']}"
    )
    table = Table(box=None, header_style="bold")
    for title in ("", "RAM", "VRAM"):
        table.add_column(title, justify="right" if title else "left")
    for label, key in (("weights", "weights"), ("KV cache", "kv_cache"), ("compute buffers", "compute")):
        table.add_row(label, human_bytes(d[key]["cpu"]), human_bytes(d[key]["gpu"]))
    table.add_row("logits", human_bytes(d["output"]), human_bytes(0))
    table.add_row("[bold]total[/bold]", human_bytes(d["ram"]), human_bytes(d["vram"]))
    table.add_row("[dim]free to use[/dim]", human_bytes(d["ram_budget"]), human_bytes(d["vram_budget"]))
    console.print(table)
    ladder = Table(box=None, header_style="bold", title="KV cache types at this context", title_justify="left")
    for title in ("K", "V", "KV cache", "RAM", "VRAM"):
        ladder.add_column(title, justify="left" if title in ("K", "V") else "right")
    for row in d["kv_types"]:
        ladder.add_row(row["type_k"], row["type_v"], human_bytes(row["kv_bytes"]), human_bytes(row["ram"]), human_bytes(row["vram"]))
    console.print(ladder)
    if not d["fits"]:
        console.print(f"[red]{d['reason']}[/red]")


def cmd_doctor(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.system.hardware import build_backend, build_of
    from edgellm.system.rpc import available

    hw = hardware_for(Settings.resolve())
    built, wanted = build_of(hw.backends), build_backend()
    pairs = {gpu.device: _kv_pairs(gpu.device) for gpu in hw.gpus if gpu.device and not gpu.assumed}
    data = asdict(hw)
    data.update(cpu_only=not hw.gpus, rpc=available(), build=built, build_for_this_machine=wanted,
                make_command=f"make chat GPU={wanted}",
                flash_attn_kv_pairs={dev: [f"{k}/{v}" for k, v in sorted(p)] for dev, p in pairs.items()})
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"CPU          {hw.cpu} ({hw.physical_cores} physical cores, {hw.logical_cpus} threads)")
    print(f"RAM          {human_bytes(hw.ram_total)} total, {human_bytes(hw.ram_available)} available")
    if hw.gpus:
        for gpu in hw.gpus:
            print(f"GPU          {gpu.name} ({gpu.backend}): {human_bytes(gpu.free)} free of {human_bytes(gpu.total)}")
    else:
        print("GPU          none usable: CPU only")
    print(f"build        llama.cpp for {built.upper()}; this machine's build: `make chat GPU={wanted}`"
          f"{'' if wanted == built else ' (not the one installed)'}")
    print(f"backends     {', '.join(hw.backends)}; GPU offload {'yes' if hw.gpu_offload else 'no'}; flash attention yes")
    for device, found in pairs.items():
        print(f"KV on GPU    {device} runs flash attention for {_describe_pairs(found)} (head size 128)")
    print(f"llama.cpp    {hw.system_info}")
    print("RPC          " + ("available: `edgellm worker` lends this machine, `--rpc HOST:PORT` uses workers; the "
                             "protocol has no authentication, so workers listen on loopback unless --allow-remote"
                             if available() else "not in this build (rebuild llama-cpp-python with -DGGML_RPC=on)"))
    for note in hw.notes:
        print(f"note         {note}")
    return 0


def _kv_pairs(device: str) -> frozenset[tuple[str, str]]:
    """K/V cache pairs a device runs flash attention for, at a typical head size (128, 32/8 heads)."""
    from edgellm.system.devices import flash_attn_pairs

    return flash_attn_pairs(device, 128, 128, 32, 8)


def _describe_pairs(pairs: frozenset[tuple[str, str]]) -> str:
    from edgellm.options import KV_TYPES

    every = {(k, v) for k in KV_TYPES for v in KV_TYPES}
    if len(pairs) * 2 > len(every):
        missing = sorted(every - pairs)
        return f"{len(pairs)} of {len(every)} K/V pairs" + (
            f"; not {' '.join(f'{k}/{v}' for k, v in missing)}" if missing else " (all)")
    listed = " ".join(f"{k}/{v}" for k, v in sorted(pairs)) or "no K/V pair"
    return f"{listed} only: other pairs run on the CPU (a `make chat GPU=cuda` build has them all)"
