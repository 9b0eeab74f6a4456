"""A loaded model that answers: its engine, its template, and the one request path (runtime/request.py)
from a conversation to a stream of Chunks. runtime/loader.py opens it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.gguf.header import GGUFHeader
from edgellm.options import SamplingOptions
from edgellm.runtime.batch import BatchEngine, GenerationRequest
from edgellm.runtime.chunks import Chunk
from edgellm.runtime.native import ContextParams, NativeModel
from edgellm.runtime.request import GenerationSpec, Prepared, prepare
from edgellm.runtime.templates import ChatTemplate, Message
from edgellm.runtime.tools import Tool

if TYPE_CHECKING:
    from edgellm.plan.fit import Plan


@dataclass(frozen=True)
class ResolvedLoad:
    """LoadOptions with every ``auto`` decided, as actually passed to llama.cpp."""

    n_ctx: int  # each sequence's
    n_batch: int
    n_threads: int
    n_gpu_layers: int
    flash_attn: bool
    type_k: str
    type_v: str
    op_offload: bool = True  # off: a GPU too small for the compute buffer, no layer on it
    n_seq: int = 1  # sequences answered side by side (a server's --parallel)
    draft: Path | None = None  # speculative decoding's draft model
    draft_max: int = 16
    draft_p_min: float = 0.75
    draft_gpu_layers: int = 0
    draft_ram: int = 0  # the draft's host memory, as planned
    plan: Plan | None = None  # the memory plan, when the planner chose anything (always for a server)
    split: tuple[tuple[str, int], ...] = ()  # layers per device as planned, when RPC workers take part
    placed: tuple[tuple[str, int], ...] = ()  # and as llama.cpp then logged placing them

    def context(self) -> ContextParams:
        """The engine context these choices make."""
        return ContextParams(n_ctx=self.n_ctx, n_batch=self.n_batch, n_threads=self.n_threads,
                             type_k=self.type_k, type_v=self.type_v, flash_attn="on" if self.flash_attn else "off",
                             op_offload=self.op_offload)


class Model:
    """A GGUF loaded into llama.cpp, with its chat template, on the engine the server batches with
    (one sampler builder, one tokenizer, one Answer, one Chunk stream). Chat, run and the app step
    its one sequence in their own thread, so a conversation's later turns reuse its KV cache by
    common prefix exactly as the server's sequences do; a server's engine runs on its own thread."""

    def __init__(self, native: NativeModel, engine: BatchEngine, header: GGUFHeader, load: ResolvedLoad,
                 template: ChatTemplate) -> None:
        self.native = native
        self.engine = engine
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
        return self.engine.n_ctx

    def close(self) -> None:
        self.engine.close()
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
        self.engine.submit(request)
        done = False
        try:
            while not done:
                self.engine.step()
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
                self.engine.step()
