"""``edgellm chat`` (interactive) and ``edgellm run`` (one answer): both stream runtime Chunks."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.cli.common import (
    add_model_options,
    hardware_for,
    read_template,
    sampling_from_args,
    spec_from_args,
    settings_from_args,
)
from edgellm.errors import EdgeLLMError, UsageError

HELP = """commands:
  /system TEXT   set the system prompt (and start over)
  /reset         forget the conversation
  /save FILE     save the conversation as JSON
  /help          this help
  /bye           leave (or Ctrl-D)
Ctrl-C stops the current answer."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("model", nargs="?", metavar="MODEL", help="store name or .gguf path (default: the bundled SmolLM2)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    _add_tool_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("run", help="answer one prompt and exit")
    p.add_argument("model", metavar="MODEL", help="store name or .gguf path")
    p.add_argument("prompt", nargs="*", metavar="PROMPT", help="the prompt (read from stdin when piped)")
    p.add_argument("--system", metavar="TEXT", help="system prompt")
    p.add_argument("--raw", action="store_true", help="continue the prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="print the answer with token counts and timings as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings after the answer")
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="with --json: each token's log-probability and the N likeliest alternatives (0-20)")
    _add_tool_options(p)
    add_model_options(p)
    p.set_defaults(func=cmd_run, trailing_words="prompt")


def _add_tool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tools", metavar="FILE|JSON",
                   help="functions the model may call (OpenAI's tools list); its calls are printed as JSON lines")
    p.add_argument("--tool-choice", default="auto", metavar="auto|required|NAME",
                   help="with --tools: let the model choose, make it call one, or call this one (default auto)")


def _load(args: argparse.Namespace):
    from edgellm.models import load_options, resolve
    from edgellm.runtime.loader import load_model

    settings = settings_from_args(args)
    template = read_template(args)
    model = resolve(args.model, settings)
    hardware = hardware_for(settings)
    loaded = load_model(model.path, load_options(settings), template, model.header, hardware)
    load = loaded.load_options
    if load.split:
        planned = " · ".join(f"{device} {n}" for device, n in load.split)
        placed = " · ".join(f"{device} {n}" for device, n in load.placed)
        print(f"layers per device: {planned} (llama.cpp placed: {placed})", file=sys.stderr)
    return model.name, loaded, settings


@contextmanager
def _ctrl_c_cancels() -> Iterator[Callable[[], bool]]:
    """While an answer streams, Ctrl-C asks it to stop instead of killing the program."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    pressed = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.set())
    try:
        yield pressed.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _stats_line(timings) -> str:
    speed = timings.tokens_per_second
    parts = [f"{timings.generated_tokens} tokens"]
    if speed:
        parts.append(f"{speed:.1f} tok/s")
    prompt_speed = timings.prompt_per_second
    evaluated = timings.prompt_tokens - timings.cached_tokens
    prompt = f"prompt {evaluated} tok"
    if timings.cached_tokens:
        prompt += f" (+{timings.cached_tokens} cached)"
    if prompt_speed:
        prompt += f" at {prompt_speed:.0f} tok/s"
    parts.append(prompt)
    return " · ".join(parts)


def _stream_to(out, chunks, logprobs: list | None = None, thoughts: list | None = None) -> tuple[str, object]:
    """Print chunks as they come (unless ``out`` is None); return the full text and the final chunk.
    Each token's log-probabilities, when asked for, go to ``logprobs``; a reasoning model's
    thinking to ``thoughts``, and shown dimmed on stderr while the answer goes to ``out``."""
    pieces = []
    last = None
    dim = sys.stderr.isatty()
    for chunk in chunks:
        if chunk.logprobs is not None and logprobs is not None:
            logprobs.append(chunk.logprobs)
        if chunk.reasoning:
            if thoughts is not None:
                thoughts.append(chunk.reasoning)
            if out is not None:
                sys.stderr.write(f"\x1b[2m{chunk.reasoning}\x1b[0m" if dim else chunk.reasoning)
                sys.stderr.flush()
        if chunk.text:
            if out is not None:
                out.write(chunk.text)
                out.flush()
            pieces.append(chunk.text)
        last = chunk
    return "".join(pieces), last


def cmd_run(args: argparse.Namespace) -> int:
    from edgellm.runtime.templates import Message

    prompt = " ".join(args.prompt)
    if not sys.stdin.isatty():
        piped = sys.stdin.read().rstrip("\n")
        prompt = f"{prompt}\n\n{piped}" if prompt and piped.strip() else prompt or piped
    if not prompt.strip():
        raise UsageError("no prompt given", hint='pass it as an argument or pipe it: echo "hi" | edgellm run MODEL')
    if args.logprobs is not None and not args.json:
        raise UsageError("--logprobs shows in the --json output", hint="add --json")
    tools = _tools(args)
    asked = spec_from_args(args, tools)  # refused before the model loads
    name, model, settings = _load(args)
    sampling = sampling_from_args(args, settings)
    with model, _ctrl_c_cancels() as cancelled:
        if args.raw:
            spec = replace(asked, prompt=tuple(model.tokenize(prompt)), reasoning=False)
        else:
            messages = ([Message("system", args.system)] if args.system else []) + [Message("user", prompt)]
            spec = replace(asked, turns=tuple(messages))
        ready = model.prepare(spec, sampling)
        chunks = model.run(ready, cancelled)
        logprobs: list = []
        thoughts: list = []
        text, last = _stream_to(None if args.json or tools else sys.stdout, chunks, logprobs, thoughts)
        calls = []
        if ready.calls is not None:
            text, calls = ready.calls.split(text)
            if not args.json:
                _print_calls(calls)
                sys.stdout.write(text)
        if args.json:
            result = {
                "model": name,
                "response": text,
                "finish_reason": last.finish_reason,
                "prompt_tokens": last.timings.prompt_tokens,
                "completion_tokens": last.timings.generated_tokens,
                "timings": last.timings.as_dict(),
            }
            if thoughts:
                result["reasoning"] = "".join(thoughts)
            if tools:
                result["tool_calls"] = [{"name": c.name, "arguments": json.loads(c.arguments)} for c in calls]
            if args.logprobs is not None:
                result["logprobs"] = [{"token": lp.text, "logprob": lp.logprob,
                                       "top": [{"token": t, "logprob": p} for _, t, p in lp.top]} for lp in logprobs]
            print(json.dumps(result, ensure_ascii=False, indent=2))
            return 0
        if (text or not calls) and not text.endswith("\n"):
            sys.stdout.write("\n")
        if args.verbose:
            print(_stats_line(last.timings), file=sys.stderr)
    return 130 if last.finish_reason == "cancelled" else 0


def _print_calls(calls: list) -> None:
    for call in calls:
        print(json.dumps({"name": call.name, "arguments": json.loads(call.arguments)}, ensure_ascii=False))


def _tools(args: argparse.Namespace) -> list:
    """``--tools``: OpenAI's list of function tools, inline or in a file, checked."""
    if args.tools is None:
        if args.tool_choice != "auto":
            raise UsageError("--tool-choice needs --tools")
        return []
    from edgellm.cli.common import json_argument
    from edgellm.runtime.tools import Tool

    given = json_argument(args.tools, "--tools")
    if not isinstance(given, list) or not given:
        raise UsageError("--tools takes a JSON list of tools, as OpenAI's API does")
    tools = []
    for item in given:
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise UsageError("each tool needs a function with a name", hint='{"type": "function", "function": {...}}')
        tools.append(Tool(function["name"], str(function.get("description", "")), function.get("parameters")))
    return tools


if TYPE_CHECKING:
    from edgellm.runtime.request import GenerationSpec


class ChatSession:
    """The conversation: history, system prompt and the slash commands."""

    def __init__(self, model, model_name: str, sampling, system: str | None, spec: GenerationSpec | None = None) -> None:
        from edgellm.runtime.request import GenerationSpec

        self.model = model
        self.model_name = model_name
        self.sampling = sampling
        self.system = system
        #: what every answer is asked: the tools offered (their calls are printed as JSON lines), a format
        self.spec = spec or GenerationSpec()
        self.history: list = []

    def messages(self) -> list:
        from edgellm.runtime.templates import Message

        return ([Message("system", self.system)] if self.system else []) + self.history

    def command(self, line: str, err) -> bool:
        """Run a slash command; False means leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            err.print("[dim]conversation cleared[/dim]")
        elif name == "/system":
            self.system = arg or None
            self.history.clear()
            err.print("[dim]system prompt set; conversation cleared[/dim]" if arg else "[dim]system prompt removed[/dim]")
        elif name == "/save":
            if not arg:
                raise UsageError("/save needs a file name")
            self.save(Path(arg).expanduser())
            err.print(f"[dim]saved to {arg}[/dim]")
        elif name in ("/help", "/?"):
            err.print(HELP, markup=False)
        else:
            raise UsageError(f"unknown command {name}", hint="/help lists them")
        return True

    def save(self, path: Path) -> None:
        from edgellm.fsutil import atomic_write_text

        data = {
            "model": self.model_name,
            "system": self.system,
            "messages": [m.as_dict() for m in self.messages()],
        }
        try:
            atomic_write_text(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        except OSError as exc:
            raise UsageError(f"cannot save to {path}: {exc.strerror}") from None

    def answer(self, text: str, out) -> object:
        from edgellm.runtime.templates import Message

        self.history.append(Message("user", text))
        tools = bool(self.spec.tools) and self.spec.tool_choice != "none"
        try:
            with _ctrl_c_cancels() as cancelled:
                ready = self.model.prepare(replace(self.spec, turns=tuple(self.messages())), self.sampling)
                reply, last = _stream_to(None if tools else out, self.model.run(ready, cancelled))
                reply, calls = ready.calls.split(reply) if ready.calls else (reply, [])
        except EdgeLLMError:
            self.history.pop()
            raise
        if ready.calls is not None:
            _print_calls(calls)
            out.write(reply)
        out.write("\n")
        self.history.append(Message("assistant", reply, tuple(calls)))
        return last


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False)
    asked = spec_from_args(args, _tools(args))  # refused before the model loads
    name, model, settings = _load(args)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    load = model.load_options
    where = "CPU" if not load.n_gpu_layers else ("all layers on GPU" if load.n_gpu_layers < 0 else f"{load.n_gpu_layers} GPU layers")
    memory = f" · RAM {load.plan.memory.cpu / 2**20:,.0f} MiB" if load.plan else ""
    err.print(
        f"[bold]{name}[/bold] [dim]· ctx {load.n_ctx} · kv {load.type_k}/{load.type_v} · "
        f"flash-attn {'on' if load.flash_attn else 'off'} · {where} · {load.n_threads} threads{memory} · "
        "/help for commands[/dim]"
    )
    session = ChatSession(model, name, sampling_from_args(args, settings), args.system, asked)
    with model:
        while True:
            try:
                line = input(">>> " if interactive else "")
            except EOFError:
                break
            except KeyboardInterrupt:
                err.print("\n[dim](use /bye or Ctrl-D to leave)[/dim]")
                continue
            line = line.strip()
            if not line:
                continue
            try:
                if line.startswith("/"):
                    if not session.command(line, err):
                        break
                    continue
                last = session.answer(line, sys.stdout)
            except EdgeLLMError as exc:
                err.print(f"[red]error:[/red] {escape(str(exc))}")
                continue
            note = " · stopped" if last.finish_reason == "cancelled" else ""
            err.print(f"[dim]{_stats_line(last.timings)}{note}[/dim]")
    return 0
