"""Options shared by the commands that load a model, and how they become Settings."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from edgellm.config import Settings
from edgellm.errors import UsageError
from edgellm.options import SamplingOptions

if TYPE_CHECKING:
    from edgellm.runtime.request import GenerationSpec
    from edgellm.workflows import Job, Step

T = TypeVar("T")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    load = parser.add_argument_group("loading")
    load.add_argument("-c", "--ctx", metavar="N|auto", help="context length in tokens (auto: the longest that fits)")
    load.add_argument("-b", "--batch", type=int, metavar="N", help="prompt batch size")
    load.add_argument("-t", "--threads", type=int, metavar="N", help="CPU threads (default: physical cores)")
    load.add_argument("--gpu-layers", "-ngl", metavar="N|all|auto", help="layers to offload to the GPU (default auto)")
    load.add_argument("--flash-attn", choices=("auto", "on", "off"), help="flash attention (default auto)")
    load.add_argument(
        "--kv-type",
        metavar="K[,V]",
        help="KV cache type for K and V: f16, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl, bf16, f32, auto",
    )
    load.add_argument("--gpu-memory", metavar="SIZE", help="free VRAM to plan for (e.g. 6GiB) instead of probing")
    load.add_argument("--ram", metavar="SIZE", help="free RAM to plan for instead of probing")
    load.add_argument(
        "--allow-long-context",
        action="store_true",
        default=None,
        help="allow a context longer than the model was trained on",
    )
    load.add_argument("--lora", metavar="FILE", help="a GGUF LoRA adapter to apply (edgellm convert-lora makes one)")
    load.add_argument("--lora-scale", type=float, metavar="S", help="how strongly the adapter applies (default 1.0)")
    load.add_argument("--rpc", metavar="HOST:PORT[,...]", help="RPC workers whose devices take layers (edgellm worker)")
    load.add_argument("--tensor-split", metavar="A,B,...", help="share of layers per GPU/remote device")
    load.add_argument("--template", type=Path, metavar="FILE", help="a Jinja chat template to use instead of the model's")
    load.add_argument("--draft", metavar="MODEL", help="speculative decoding: a small model with the same vocabulary "
                      "guesses tokens for this one to verify (store name or .gguf path)")
    load.add_argument("--draft-max", type=int, metavar="N", help="most tokens the draft guesses at a time (default 16)")
    load.add_argument("--draft-p-min", type=float, metavar="P",
                      help="the draft stops guessing below this confidence (default 0.75)")
    sample = parser.add_argument_group("sampling")
    sample.add_argument("--temperature", "--temp", type=float, metavar="T")
    sample.add_argument("--top-k", type=int, metavar="K")
    sample.add_argument("--top-p", type=float, metavar="P")
    sample.add_argument("--min-p", type=float, metavar="P")
    sample.add_argument("--repeat-penalty", type=float, metavar="R")
    sample.add_argument("-n", "--max-tokens", type=int, metavar="N", help="answer length limit (-1: none)")
    sample.add_argument("--stop", action="append", metavar="TEXT", help="stop the answer at TEXT (repeatable)")
    sample.add_argument("--presence-penalty", type=float, metavar="P", help="-2..2: lower tokens already used")
    sample.add_argument("--frequency-penalty", type=float, metavar="F", help="-2..2: lower tokens by how often used")
    sample.add_argument("--seed", type=int, help="sampling seed: the same seed gives the same answer (-1: random)")
    sample.add_argument("--json-schema", metavar="FILE|JSON",
                        help="answer in JSON that follows this schema ('{}' for any JSON object)")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """CLI values on top of the environment, the config file and the defaults."""
    cli: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "ctx", "batch", "threads", "gpu_layers", "flash_attn", "seed", "allow_long_context",
            "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "max_tokens", "stop",
            "presence_penalty", "frequency_penalty",
            "gpu_memory", "ram", "lora", "lora_scale", "rpc", "tensor_split", "draft", "draft_max",
            "draft_p_min",
        )
    }
    kv = getattr(args, "kv_type", None)
    if kv:
        parts = [p.strip() for p in kv.split(",")]
        if len(parts) > 2 or not all(parts):
            raise UsageError(f"--kv-type takes K or K,V, got {kv!r}")
        cli["kv_type_k"], cli["kv_type_v"] = parts[0], parts[-1]
    return Settings.resolve(cli)


def sampling_from_args(args: argparse.Namespace, settings: Settings) -> SamplingOptions:
    """The settings' sampling with this command's own ``--logprobs``."""
    from dataclasses import replace

    return replace(settings.sampling, logprobs=getattr(args, "logprobs", None))


def spec_from_args(args: argparse.Namespace, tools: list) -> GenerationSpec:
    """What ``run`` and ``chat`` ask of every answer, as a server request would ask it: the tools
    and ``--tool-choice``, ``--json-schema`` (its turns or prompt are added per answer)."""
    from edgellm.runtime.request import GenerationSpec, check

    schema = None
    if getattr(args, "json_schema", None) is not None:
        schema = json_argument(args.json_schema, "--json-schema") or None
    choice = getattr(args, "tool_choice", "auto")
    named = choice not in ("auto", "required", "none")
    return check(GenerationSpec(
        tools=tuple(tools), tool_choice="function" if named else choice, tool_name=choice if named else None,
        json_answer=getattr(args, "json_schema", None) is not None, json_schema=schema, fields=_CLI_FIELDS))


#: the options a refusal of a spec names
_CLI_FIELDS = {"format": "--json-schema", "tools": "--tools", "tool_choice": "--tool-choice",
               "messages": "prompt"}


def json_argument(value: str, option: str) -> Any:
    """A JSON value given inline or as a file name; a clear error for either gone wrong."""
    import json

    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            text = Path(value).expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read {option} file {value}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None


def hardware_for(settings: Settings):
    """The machine to plan for: probed, with any stated memory budgets applied."""
    from edgellm.system.hardware import probe

    return probe(settings.gpu_memory, settings.ram, settings.load.rpc)


def read_template(args: argparse.Namespace) -> str | None:
    path = getattr(args, "template", None)
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read template {path}: {getattr(exc, 'strerror', None) or exc}") from None


def job_with_bar(call: Callable[[Job], T]) -> T:
    """``call(job)`` under one progress bar on stderr that follows the job's steps (bytes, or
    tensors), naming the stage and the file or tensor in hand; a new stage starts a new bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from edgellm.gguf.header import human_bytes
    from edgellm.workflows import Job

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[amount]}"),
                   TimeRemainingColumn(), transient=True, disable=not sys.stderr.isatty())
    tasks: dict[str, Any] = {}

    def on_step(step: Step) -> None:
        if step.stage not in tasks:
            tasks[step.stage] = bar.add_task(step.stage, total=None, amount="")
        amount = (f"{human_bytes(step.done)}/{human_bytes(step.total or 0)}" if step.unit == "bytes"
                  else f"{step.done}/{step.total} {step.unit}")
        bar.update(tasks[step.stage], completed=step.done, total=step.total, amount=amount,
                   description=f"{step.stage} {step.detail}".strip())

    with bar:
        return call(Job(on_step))
