"""``edgellm finetune`` (a LoRA or QLoRA on a data file), ``edgellm export`` (a run into the store)
and ``edgellm plan --finetune`` (what a run would need, before any loading)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from edgellm.cli.common import job_with_bar
from edgellm.errors import UsageError
from edgellm.gguf.header import human_bytes
from edgellm.plan.training import OPTIMIZER_BYTES

#: --targets shorthands: the projection names most decoder checkpoints use
TARGET_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qlora", action="store_true", help="train on a 4-bit NF4 base (about a quarter of the memory)"
    )
    p.add_argument("--rank", "-r", type=int, default=16, metavar="R", help="LoRA rank (default 16)")
    p.add_argument(
        "--targets",
        default="all-linear",
        metavar="all-linear|q,k,v,o,...",
        help="linear layers the adapter goes on (default all-linear)",
    )
    p.add_argument(
        "--max-len", type=int, default=1024, metavar="N", help="longest example in tokens (default 1024)"
    )
    p.add_argument(
        "--batch", metavar="N|auto", help="rows per step (default auto: the most that fit, up to 8)"
    )
    p.add_argument(
        "--gradient-checkpointing",
        choices=("auto", "on", "off"),
        default="auto",
        help="recompute activations instead of keeping them (auto: only when needed to fit)",
    )
    p.add_argument(
        "--optim",
        default="adamw",
        choices=tuple(OPTIMIZER_BYTES),
        help="AdamW (default), or bitsandbytes' 8-bit (a quarter of the state) or paged ones",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="the base's weights (auto: bf16 on a GPU or a CPU with bf16 units, else fp32)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="train a LoRA (or QLoRA) adapter on a JSONL data file")
    p.add_argument(
        "base", metavar="BASE", help="HF checkpoint folder, a pulled checkpoint's name, or a Hub repo"
    )
    p.add_argument(
        "data",
        type=Path,
        metavar="DATA.jsonl",
        help="messages, prompt+completion, instruction+output (Alpaca) or text records",
    )
    add_train_options(p)
    p.add_argument("--ram", metavar="SIZE", help="free RAM to plan for instead of probing")
    p.add_argument("--gpu-memory", metavar="SIZE", help="free VRAM to plan for instead of probing")
    p.add_argument("--alpha", type=float, metavar="A", help="LoRA alpha (default twice the rank)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, metavar="N", help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, metavar="N", help="optimizer steps instead of epochs")
    p.add_argument("--lr", type=float, default=2e-4, metavar="LR", help="peak learning rate (default 2e-4)")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--eval", type=Path, metavar="FILE", help="held-out examples for the eval loss")
    held.add_argument(
        "--eval-split", type=float, default=0.0, metavar="F", help="hold out this share of the data"
    )
    p.add_argument(
        "--pack",
        choices=("auto", "on", "off"),
        default="auto",
        help="several examples per row (auto: when it saves padding)",
    )
    p.add_argument("--seed", type=int, default=0, help="data order seed")
    p.add_argument(
        "--save-every", type=int, default=50, metavar="N", help="checkpoint every N steps (default 50)"
    )
    p.add_argument("--name", help="the run's name (default BASE-DATA)")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel in N processes through accelerate's launcher (a GPU each)",
    )
    p.add_argument(
        "--export", metavar="QUANT", help="then merge, convert and quantize into the store (e.g. Q4_K_M)"
    )
    p.add_argument(
        "--base-16bit",
        type=Path,
        metavar="DIR",
        help="for --export of a run on a 4-bit (bnb) checkpoint: merge into this 16-bit one instead of "
        "the 4-bit weights it trained against",
    )
    p.add_argument(
        "--json", action="store_true", help="one JSON object per line for each step, eval and save"
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("export", help="a fine-tuning run's adapter merged into its base, into the store")
    p.add_argument("run", metavar="RUN", help="a run's name (edgellm finetune --name) or its adapter folder")
    p.add_argument("quant", nargs="?", default=None, metavar="QUANT", help="Q4_K_M, Q8_0, ... (default F16)")
    p.add_argument("--name", help="store name (default RUN-QUANT)")
    p.add_argument(
        "--base-16bit", type=Path, metavar="DIR",
        help="merge into this 16-bit base (default: the run's own, 4-bit ones dequantized)"
    )
    p.add_argument(
        "--lora-gguf", type=Path, metavar="FILE", help="write the adapter alone as a GGUF LoRA instead"
    )
    p.set_defaults(func=cmd_export)


def _targets(text: str) -> str | tuple[str, ...]:
    if text == "all-linear":
        return text
    names = tuple(TARGET_NAMES.get(t.strip(), t.strip()) for t in text.split(",") if t.strip())
    if not names:
        raise UsageError("--targets takes all-linear or layer names (q,k,v,o,gate,up,down or q_proj,...)")
    return names


def _positive(value: str | None, option: str) -> int | None:
    if value in (None, "auto"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{option} takes a number or auto, got {value!r}") from None
    if number < 1:
        raise UsageError(f"{option} must be positive")
    return number


def request_from_args(args: argparse.Namespace):
    from edgellm.workflows import Finetune

    switch = {"auto": None, "on": True, "off": False}
    return Finetune(
        base=args.base,
        data=getattr(args, "data", Path()),
        name=getattr(args, "name", None),
        qlora=args.qlora,
        rank=args.rank,
        alpha=getattr(args, "alpha", None),
        targets=_targets(args.targets),
        epochs=getattr(args, "epochs", None),
        steps=getattr(args, "steps", None),
        lr=getattr(args, "lr", 2e-4),
        max_len=args.max_len,
        batch=_positive(args.batch, "--batch"),
        eval_file=getattr(args, "eval", None),
        eval_split=getattr(args, "eval_split", 0.0),
        pack=switch[getattr(args, "pack", "auto")],
        gradient_checkpointing=switch[args.gradient_checkpointing],
        seed=getattr(args, "seed", 0),
        dtype=None if args.dtype == "auto" else args.dtype,
        optimizer=args.optim,
        save_every=max(1, getattr(args, "save_every", 50)),
        resume=getattr(args, "resume", False),
    ).check()


def _hardware(args: argparse.Namespace):
    from edgellm.cli.common import hardware_for
    from edgellm.config import Settings

    settings = Settings.resolve({"gpu_memory": args.gpu_memory, "ram": args.ram})
    return settings, hardware_for(settings)


def launch(devices: int, argv: list[str]) -> int:
    """The same command in ``devices`` processes through accelerate's launcher (data parallel:
    a GPU each, or on a CPU processes that share it over gloo); each sees WORLD_SIZE and trains
    its share of every step. Ctrl-C reaches them all; the run keeps its last checkpoint."""
    import subprocess

    if devices < 1:
        raise UsageError("--devices must be positive")
    launcher = f"--multi_gpu --num_processes {devices} --num_machines 1 --mixed_precision no"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher.split(), "--dynamo_backend", "no",
           "-m", "edgellm", *argv]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 130


def cmd_finetune(args: argparse.Namespace) -> int:
    from edgellm.models import store_for
    from edgellm.train.curve import plot, verdict
    from edgellm.train.model import first_process, world_size
    from edgellm.workflows import Job, export_run, finetune, plan_finetune

    if args.devices > 1 and world_size() == 1:  # not yet one of the launched processes
        return launch(args.devices, sys.argv[1:])
    request = request_from_args(args)
    settings, hw = _hardware(args)
    store = store_for(settings)
    plan = job_with_bar(
        lambda job: plan_finetune(request, store, settings.runs_dir, settings.checkpoints_dir, hw, job)
    )
    main = first_process()  # of several processes (--devices), the first one speaks

    def say(text: str) -> None:
        if main:
            print(text, file=sys.stderr if args.json else sys.stdout)  # --json: stdout is the events'

    say(plan.data.summary())
    if plan.eval_data is not None:
        say(f"eval: {len(plan.eval_data.examples)} examples")
    say(verdict(plan.memory))
    packed, padded = plan.padding[1], plan.padding[0]
    say(
        f"rows: {'packed' if plan.loop.pack else 'padded'} (padding {100 * padded:.0f}% padded, "
        f"{100 * packed:.0f}% packed); run {plan.name} in {plan.run}"
    )
    for note in plan.notes:
        say(note)
    job = Job()
    # Ctrl-C: the run stops at the next step and keeps a checkpoint
    previous = signal.signal(signal.SIGINT, lambda *_: job.cancel.set())
    try:
        with _Reporter(args.json, quiet=not main) as report:
            outcome = finetune(plan, request, job, report)
    finally:
        signal.signal(signal.SIGINT, previous)
    h = outcome.history
    for line in plot(h.losses, width=60, height=8):
        say(line)
    evals = (
        " -> ".join(f"{v:.3f}" for _, v in (h.eval_losses[:1] + h.eval_losses[-1:])) if h.eval_losses else ""
    )
    say(
        f"adapter: {outcome.adapter} (loss {h.losses[0]:.3f} -> {h.losses[-1]:.3f}"
        f"{', eval ' + evals if evals else ''}; {h.tokens} tokens, {outcome.tokens_per_second:.0f} tok/s, "
        f"peak {human_bytes(outcome.peak_memory)})"
    )
    if args.export and main:
        if plan.memory.settings.method == "qlora":
            say("export: merging into the 16-bit base the 4-bit weights were made from")
        result, entry = job_with_bar(
            lambda job: export_run(store, outcome.adapter, args.export, job, base_16bit=args.base_16bit)
        )
        say(
            f"exported: {entry.name} ({result.arch}, {human_bytes(entry.manifest.size)}); "
            f'try: edgellm run {entry.name} "..."'
        )
    elif not args.json:
        say(f"next: edgellm export {plan.name} Q4_K_M")
    return 0


class _Reporter:
    """Each event as a live status line (a terminal), a line per tenth of the run (a pipe), or a
    JSON object per line (--json)."""

    def __init__(self, as_json: bool, quiet: bool = False) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.live: Any = None
        self.last_eval: float | None = None
        self.shown = 0

    def __enter__(self) -> _Reporter:
        if not self.as_json and not self.quiet and sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live("", console=Console(stderr=True), transient=True, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(None, None, None)

    def __call__(self, event: Any) -> None:
        from edgellm.train.curve import status_line
        from edgellm.train.loop import Evaluated, Progress, Saved

        if self.quiet:
            return
        if self.as_json:
            fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(event).items()}
            print(json.dumps({"event": type(event).__name__.lower(), **fields}), flush=True)
            return
        if isinstance(event, Evaluated):
            self.last_eval = event.eval_loss
            line = f"eval loss {event.eval_loss:.4f} at step {event.step}"
        elif isinstance(event, Saved):
            line = f"checkpoint: {event.path}"
        elif isinstance(event, Progress):
            line = status_line(event, self.last_eval)
            if self.live is not None:
                self.live.update(line)
                return
            if event.step < self.shown + max(1, event.total // 10) and event.step != event.total:
                return
            self.shown = event.step
        else:
            return
        if self.live is not None:
            self.live.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)


def cmd_export(args: argparse.Namespace) -> int:
    from edgellm.config import Settings
    from edgellm.models import store_for
    from edgellm.workflows import export_run

    settings = Settings.resolve()
    adapter = Path(args.run).expanduser()
    if not (adapter / "adapter_config.json").is_file():
        from edgellm.models.store import check_name

        adapter = settings.runs_dir / check_name(args.run) / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UsageError(
            f"no finished run or adapter folder {args.run}",
            hint="runs are listed in " + str(settings.runs_dir),
        )
    if args.lora_gguf:
        from edgellm.convert.lora import convert_lora
        from edgellm.train.loop import read_record

        base = args.base_16bit or Path(read_record(adapter).get("base") or "")
        result = job_with_bar(
            lambda job: convert_lora(adapter, base, args.lora_gguf, "f16", progress=job.tensors_of("write"))
        )
        print(
            f"{result.path}: LoRA for {result.arch}, {human_bytes(result.size)} "
            f"(use: edgellm chat MODEL --lora {result.path})"
        )
        return 0
    result, entry = job_with_bar(
        lambda job: export_run(
            store_for(settings), adapter, args.quant, job, name=args.name, base_16bit=args.base_16bit
        )
    )
    print(f'{entry.name}: {result.arch}, {human_bytes(entry.manifest.size)} (edgellm run {entry.name} "...")')
    return 0


def cmd_plan_finetune(args: argparse.Namespace) -> int:
    """``edgellm plan --finetune BASE``: the training-memory plan, from config.json alone, chosen by
    the same rule a run uses (without its data: every token learned, rows of --max-len)."""
    import dataclasses

    from edgellm.plan.training import TrainShape, nearest_fit
    from edgellm.train.curve import verdict
    from edgellm.workflows import base_config, training_memory

    request = request_from_args(args)
    settings, hw = _hardware(args)
    shape = TrainShape.from_config(base_config(args.base, settings.checkpoints_dir, settings))
    memory, notes = training_memory(request, shape, hw, "cuda" if hw.gpus else "cpu")
    near = None if memory.fits else nearest_fit(shape, memory.settings, memory.available)
    if args.json:
        out = memory.as_dict()
        out["nearest_fit"] = dataclasses.asdict(near) if near else None
        print(json.dumps(out, indent=2))
        return 0
    print(f"{shape.arch}: {shape.params / 1e6:,.0f}M parameters, {shape.layers} layers")
    width = max(len(p.name) for p in memory.parts)
    for part in memory.parts:
        print(f"  {part.name:<{width}}  {human_bytes(part.bytes):>10}  {part.note}")
    print(verdict(memory))
    for note in notes:
        print(note)
    if near is not None:
        print(
            f"nearest that fits: {near.method}, batch {near.batch}, max-len {near.max_len}"
            f"{', gradient checkpointing' if near.gradient_checkpointing else ''}"
        )
    return 0 if memory.fits else 1
