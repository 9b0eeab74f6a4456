"""Load a GGUF with llama.cpp and stream answers from it as Chunks.

This is the only module that runs inference through ``llama_cpp``. Everything that can be known
before loading (a damaged file, a context too long, a quantized V cache without flash attention)
is refused here with a clear message before llama.cpp sees it, because llama.cpp itself only
says "Failed to create llama_context".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import LoadError, UsageError
from edgellm.gguf.header import GGUFHeader, check_lora, read_header
from edgellm.options import (
    LoadOptions,
    SamplingOptions,
    default_context,
    is_quantized_kv,
    uses_flash_attn,
)
from edgellm.runtime.batch import BatchEngine, GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.native import NativeModel
from edgellm.runtime.request import GenerationSpec, Prepared, prepare
from edgellm.runtime.speculative import load_drafter
from edgellm.runtime.templates import ChatTemplate, Message
from edgellm.runtime.tools import Tool
from edgellm.system import llamalog
from edgellm.system.hardware import physical_cores

if TYPE_CHECKING:
    from edgellm.plan.fit import Plan
    from edgellm.system.hardware import Hardware


@dataclass(frozen=True)
class ResolvedLoad:
    """LoadOptions with every ``auto`` decided, as actually passed to llama.cpp."""

    n_ctx: int
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    flash_attn: bool
    type_k: str
    type_v: str
    op_offload: bool = True  # off: a GPU too small for the compute buffer, no layer on it
    draft: Path | None = None  # speculative decoding's draft model
    draft_max: int = 16
    draft_p_min: float = 0.75
    draft_gpu_layers: int = 0
    plan: Plan | None = None  # the memory plan, when the planner chose anything
    split: tuple[tuple[str, int], ...] = ()  # layers per device as planned, when RPC workers take part
    placed: tuple[tuple[str, int], ...] = ()  # and as llama.cpp then logged placing them


def resolve_load(header: GGUFHeader, options: LoadOptions, hardware: Hardware | None = None) -> ResolvedLoad:
    """Decide the automatic choices and refuse impossible ones before llama.cpp is involved."""
    trained = header.context_length or 0
    n_ctx = default_context(trained) if options.n_ctx is None else options.n_ctx
    if trained and n_ctx > trained and not options.allow_long_context:
        raise UsageError(
            f"context {n_ctx} is longer than the {trained} tokens {header.path.name} was trained on",
            hint="answers degrade past it; pass --allow-long-context to use it anyway",
            app_hint="answers degrade past it; choose a shorter context in the settings (s)",
        )
    if options.flash_attn == "off" and is_quantized_kv(options.type_v):
        raise UsageError(
            f"a quantized V cache ({options.type_v}) needs flash attention, which is turned off",
            hint="use --flash-attn on (or auto), or an f16 V cache",
            app_hint="set flash attention to on or auto in the settings (s), or the V cache to f16",
        )
    type_k, type_v, n_gpu_layers, plan = options.type_k, options.type_v, options.n_gpu_layers, None
    n_batch = min(options.n_batch, n_ctx) if n_ctx else options.n_batch
    draft = read_header(options.draft) if options.draft else None
    taken = None  # the draft model's memory
    if n_ctx == 0 or n_gpu_layers is None or "auto" in (type_k, type_v) or draft is not None:
        from edgellm.plan.fit import fit_with_draft
        from edgellm.system.hardware import probe

        plan, taken = fit_with_draft(
            header, draft, hardware or probe(), n_ctx=n_ctx, type_k=type_k, type_v=type_v,
            n_gpu_layers=n_gpu_layers, flash_attn=options.flash_attn, n_ubatch=n_batch, draft_max=options.draft_max,
        )
        if not plan.fits:
            raise LoadError(f"{header.path.name} {plan.reason}" + (f" beside draft {draft.path.name}" if draft else ""))
        n_ctx = n_ctx or plan.n_ctx
        type_k, type_v, n_gpu_layers = plan.type_k, plan.type_v, plan.n_gpu_layers
        flash_attn = plan.flash_attn
    else:
        n_gpu_layers, flash_attn = _on_device(header, options, hardware)
    return ResolvedLoad(
        n_ctx=n_ctx,
        n_batch=min(options.n_batch, n_ctx),
        n_threads=options.n_threads or physical_cores(),
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_v,
        op_offload=plan.op_offload if plan else True,
        plan=plan,
        draft=draft.path if draft else None,
        draft_max=options.draft_max,
        draft_p_min=options.draft_p_min,
        draft_gpu_layers=taken.n_gpu_layers if taken else 0,
    )


def _on_device(header: GGUFHeader, options: LoadOptions, hardware: Hardware | None) -> tuple[int, bool]:
    """GPU layers and flash attention for settings given in full: no layers where there is no GPU
    (llama.cpp would ignore them; saying so keeps the status line true), a K/V pair the GPU has no
    flash-attention kernel for refused, and flash attention decided as the planner would."""
    if options.n_gpu_layers == 0:
        return 0, uses_flash_attn(options.flash_attn, options.type_v)
    from edgellm.plan.fit import flash_attn_for, flash_attn_pairs, unsupported_pair
    from edgellm.plan.memory import ModelShape
    from edgellm.system.hardware import probe

    hardware, shape = hardware or probe(), ModelShape.from_header(header)
    if not hardware.gpus:
        return 0, uses_flash_attn(options.flash_attn, options.type_v)
    why = unsupported_pair(hardware, shape, options.type_k, options.type_v, options.flash_attn)
    if why is not None:
        raise UsageError(f"{header.path.name}: {why}")
    pairs = flash_attn_pairs(hardware, shape)
    return options.n_gpu_layers, flash_attn_for(pairs, options.type_k, options.type_v, options.flash_attn)


class Model:
    """A GGUF loaded into llama.cpp, with its chat template: one sequence on the same native engine
    the server batches with (one sampler builder, one tokenizer, one Answer, one Chunk stream), so a
    conversation's later turns reuse its KV cache by common prefix exactly as the server's do."""

    def __init__(self, native: NativeModel, engine: BatchEngine, header: GGUFHeader, load: ResolvedLoad,
                 template: ChatTemplate) -> None:
        self.native = native
        self._engine = engine
        self.header = header
        self.load_options = load
        self.template = template
        self.piece = native.piece
        self.bos_text = native.bos_text
        self.eos_text = native.eos_text

    @property
    def path(self) -> Path:
        return self.header.path

    @property
    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def close(self) -> None:
        self._engine.close()
        self.native.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- text <-> tokens ------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Tokens for text, special tokens parsed; BOS added once, as the vocabulary wants."""
        return self.native.prompt_tokens(text) if add_special else self.native.tokenize(text, False, True)

    def prompt_tokens(self, text: str) -> list[int]:
        return self.native.prompt_tokens(text)

    def render(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> str:
        """The prompt text the chat template makes of a conversation, ready for an answer."""
        return self.template.render(messages, True, self.bos_text, self.eos_text, tools)

    def is_end(self, token: int) -> bool:
        return self.native.is_end(token)

    # -- generation -----------------------------------------------------------------------
    def prepare(self, spec: GenerationSpec, sampling: SamplingOptions) -> Prepared:
        """What the engine runs for ``spec``, ``sampling`` filling what the spec leaves open: the
        same meaning a server gives the same request (runtime/request.py)."""
        return prepare(spec, self, sampling)

    def run(self, ready: Prepared, cancel: Callable[[], bool] | None = None) -> Iterator[Chunk]:
        """Answer a prepared request; ``cancel`` is checked after each token."""
        return self._stream(ready.request(), cancel)

    def chat(
        self,
        messages: Sequence[Message],
        sampling: SamplingOptions,
        cancel: Callable[[], bool] | None = None,
        tools: Sequence[Tool] = (),
    ) -> Iterator[Chunk]:
        """Answer the conversation as the assistant; earlier turns reuse the KV cache. ``tools``
        are offered to the model (``prepare`` gives the rules its calls are read with)."""
        spec = GenerationSpec(tuple(messages), tools=tuple(tools), grammar=sampling.grammar,
                              grammar_triggers=sampling.grammar_triggers)
        return self.run(self.prepare(spec, sampling), cancel)

    def complete(
        self, prompt: str, sampling: SamplingOptions, cancel: Callable[[], bool] | None = None
    ) -> Iterator[Chunk]:
        """Continue raw text, with no chat template."""
        return self.generate(self.tokenize(prompt), sampling, cancel)

    def generate(
        self,
        tokens: Sequence[int],
        sampling: SamplingOptions,
        cancel: Callable[[], bool] | None = None,
        reasoning: bool = False,
    ) -> Iterator[Chunk]:
        """Answer a prompt of tokens; ``reasoning`` splits a ``<think>`` block into Chunk.reasoning."""
        spec = GenerationSpec(prompt=tuple(tokens), grammar=sampling.grammar, grammar_triggers=sampling.grammar_triggers,
                              reasoning=reasoning)
        return self.run(self.prepare(spec, sampling), cancel)

    def _stream(self, request: GenerationRequest, cancel: Callable[[], bool] | None) -> Iterator[Chunk]:
        """Advance the engine in this thread, a token a step, checking ``cancel`` after each."""
        out: list[Chunk | BaseException] = []
        request.emit = out.append
        self._engine.submit(request)
        done = False
        try:
            while not done:
                self._engine.step()
                for item in out:
                    if isinstance(item, BaseException):
                        done = True
                        raise item
                    done = item.finish_reason is not None
                    yield item
                out.clear()
                if cancel is not None and cancel():
                    request.cancelled.set()
        finally:
            if not done:  # a caller that stops reading ends the answer and frees the sequence
                request.cancelled.set()
                self._engine.step()


def rpc_split(header: GGUFHeader, n_gpu_layers: int, hardware: Hardware,
              tensor_split: tuple[float, ...] = ()) -> tuple[tuple[str, int], ...]:
    """Layers per device as llama.cpp will place them (it puts RPC devices first in its list),
    each device named as llama.cpp logs it, with the worker's address: ``RPC0@host:port``."""
    from edgellm.plan.fit import layer_split

    gpus = sorted(hardware.gpus, key=lambda g: not g.backend.startswith("RPC"))
    if tensor_split and len(tensor_split) != len(gpus):
        raise UsageError(f"--tensor-split has {len(tensor_split)} shares for {len(gpus)} devices "
                         f"({', '.join(g.device for g in gpus)})")
    n_layer = int(header.arch_value("block_count") or 0)
    named = [(f"{g.device}@{g.name}" if g.backend.startswith("RPC") else g.device or g.name, g.free) for g in gpus]
    return tuple(layer_split(n_layer, n_gpu_layers, named, tensor_split))


def load_model(
    path: str | Path,
    options: LoadOptions | None = None,
    template: str | None = None,
    header: GGUFHeader | None = None,
    hardware: Hardware | None = None,
) -> Model:
    """Validate, plan, then load a GGUF. ``template`` overrides the file's own chat template;
    ``hardware`` is what the planner plans for (default: probe this machine)."""
    options = options or LoadOptions()
    header = header or read_header(path)
    if options.rpc:
        from edgellm.system.hardware import probe

        hardware = hardware or probe(rpc=options.rpc)
    load = resolve_load(header, options, hardware)
    if options.rpc:
        load = replace(load, split=rpc_split(header, load.n_gpu_layers, hardware, options.tensor_split))
    lora = check_lora(options.lora, header)
    chat_template = _template_for(header, template)
    position = llamalog.mark()
    native = NativeModel(header.path, load.n_gpu_layers, lora, options.lora_scale, options.tensor_split)
    drafter = None
    try:
        if load.draft:
            drafter = load_drafter(load.draft, native, 1, load.n_ctx, load.n_batch, load.n_threads, load.draft_max,
                                   load.draft_p_min, load.draft_gpu_layers)
        engine = BatchEngine(native, 1, load.n_ctx, load.n_threads, n_batch=load.n_batch, type_k=load.type_k,
                             type_v=load.type_v, flash_attn="on" if load.flash_attn else "off",
                             op_offload=load.op_offload, threaded=False, drafter=drafter)
    except BaseException:
        if drafter is not None:
            drafter.close()
        native.close()
        raise
    if load.split:
        load = replace(load, placed=tuple(llamalog.layers_placed(position).items()))
    return Model(native, engine, header, load, chat_template)


def _template_for(header: GGUFHeader, override: str | None) -> ChatTemplate:
    if override is not None:
        return ChatTemplate(override, origin="--template")
    return ChatTemplate(header.chat_template, origin="GGUF")
