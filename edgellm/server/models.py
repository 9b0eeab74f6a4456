"""The models a server answers for: loaded on first use, unloaded when idle or when memory is needed.

With a MODEL given, the server answers for that model only; without, for every model in the store,
picked by the request's ``model`` field. Before a model loads, the planner checks it fits beside
those already loaded; the least recently used idle ones are unloaded to make room.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from edgellm.config import Settings
from edgellm.errors import EdgeLLMError, LoadError, ModelNotFoundError, brief
from edgellm.gguf.header import GGUFHeader, check_lora, read_header
from edgellm.models import BUNDLED_NAME, ResolvedModel, load_options, resolve, store_for
from edgellm.models.store import NAME_RE
from edgellm.options import default_context
from edgellm.plan.fit import Plan, fit_with_draft
from edgellm.runtime.batch import BatchEngine
from edgellm.runtime.native import NativeModel
from edgellm.runtime.speculative import load_drafter
from edgellm.runtime.templates import ChatTemplate
from edgellm.system.hardware import Hardware, physical_cores


@dataclass(eq=False)
class Served:
    name: str
    header: GGUFHeader
    native: NativeModel
    engine: BatchEngine
    template: ChatTemplate
    plan: Plan
    last_used: float
    draft_ram: int = 0  # host memory of its draft model, if it speculates

    @property
    def ram(self) -> int:
        return self.plan.memory.cpu + self.draft_ram

    # what a request is prepared for (runtime.request.Target)
    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def bos_text(self) -> str:
        return self.native.bos_text

    @property
    def eos_text(self) -> str:
        return self.native.eos_text

    def prompt_tokens(self, text: str) -> list[int]:
        return self.native.prompt_tokens(text)

    def piece(self, token: int) -> bytes:
        return self.native.piece(token)

    def close(self) -> None:
        self.engine.close()
        self.native.close()


class ModelPool:
    def __init__(
        self, settings: Settings, model: str | None, parallel: int, keep_alive: float, hardware: Hardware,
        max_queue: int = 64, template: str | None = None,
    ) -> None:
        """``template``: a chat template every served model uses instead of its own (--template)."""
        self.template = ChatTemplate(template, origin="--template") if template is not None else None
        self.settings = settings
        self.max_queue = max_queue
        self.fixed = resolve(model, settings) if model else None  # validates the file at start-up
        self.parallel = parallel
        self.keep_alive = keep_alive
        self.hardware = hardware
        self._loaded: dict[str, Served] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: str | None = None  # the last RPC worker failure, for /health
        if keep_alive >= 0:
            threading.Thread(target=self._reap, name="edgellm-keep-alive", daemon=True).start()
        if settings.load.rpc:
            from edgellm.system.rpc import on_worker_failure

            on_worker_failure(self._worker_failed)

    def _worker_failed(self, error: EdgeLLMError) -> None:
        """A worker died under a loaded model: its requests fail, the model is dropped unfreed
        (freeing it would talk to the dead worker), and the next request loads it anew."""
        self.failure = error.message
        # no lock: the thread that found out may be a request's, holding it while it loads
        dropped = list(self._loaded.values())
        self._loaded.clear()
        for served in dropped:
            served.engine.abandon(LoadError(error.message))

    def _reap(self) -> None:
        while not self._stop.wait(min(max(self.keep_alive / 4, 0.5), 10)):
            self.unload_idle()

    def describe(self, name: str | None) -> ResolvedModel:
        """A served model's file and header, without loading it (a name it does not serve: 404)."""
        key = self._key(name)
        return self.fixed or resolve(key, self.settings, store_only=True)

    def loaded(self) -> list[Served]:
        with self._lock:
            return list(self._loaded.values())

    def names(self) -> list[str]:
        if self.fixed:
            return [self.fixed.name]
        return [e.name for e in store_for(self.settings).list()]

    def get(self, name: str | None) -> Served:
        """The served model for a request's ``model`` field, loading it if needed (blocking)."""
        with self._lock:
            key = self._key(name)
            served = self._loaded.get(key)
            if served is None:
                served = self._load(key)
                self._loaded[key] = served
            served.last_used = time.monotonic()
            return served

    def _key(self, name: str | None) -> str:
        """A request names a model of the store, never a file: the name is only ever looked up there."""
        if self.fixed:
            if name and name not in (self.fixed.name, str(self.fixed.path)):
                raise ModelNotFoundError(f"model {brief(name)} is not served here", hint=f"this server serves {self.fixed.name}")
            return self.fixed.name
        if not name:
            raise ModelNotFoundError("the request names no model", hint="set the model field; GET /v1/models lists them")
        key = name.lower()
        if key != BUNDLED_NAME and (not NAME_RE.match(key) or ".." in key or not store_for(self.settings).exists(key)):
            raise ModelNotFoundError(f"model {brief(name)} is not in the store", hint="GET /v1/models lists them")
        return key

    def _load(self, key: str) -> Served:
        model = self.fixed or resolve(key, self.settings, store_only=True)
        if not model.path.is_file():  # removed (edgellm rm) while served
            raise ModelNotFoundError(f"model {model.name} is gone: {model.path.name} was removed",
                                     hint="import or pull it again, or restart the server with another model")
        load = load_options(self.settings)
        per_slot = load.n_ctx or default_context(model.header.context_length)
        plan, draft = fit_with_draft(
            model.header, read_header(load.draft) if load.draft else None, self.hardware,
            n_ctx=per_slot * self.parallel, type_k=load.type_k, type_v=load.type_v, n_gpu_layers=load.n_gpu_layers,
            flash_attn=load.flash_attn, n_seq=self.parallel, draft_max=load.draft_max,
        )
        if not plan.fits:
            raise LoadError(f"{model.name} {plan.reason}")
        self._make_room(plan.memory.cpu + (draft.cpu if draft else 0), plan.ram_budget)
        if load.rpc:  # llama.cpp would abort on a worker that died since the last load
            from edgellm.system.rpc import check_alive

            check_alive(load.rpc)
        native = NativeModel(model.path, plan.n_gpu_layers, check_lora(load.lora, model.header), load.lora_scale,
                             load.tensor_split)
        threads, n_batch, drafter = load.n_threads or physical_cores(), max(load.n_batch, 512), None
        try:
            if draft is not None:
                drafter = load_drafter(load.draft, native, self.parallel, per_slot, n_batch, threads, load.draft_max,
                                       load.draft_p_min, draft.n_gpu_layers)
            engine = BatchEngine(
                native, self.parallel, per_slot, threads, n_batch=n_batch, type_k=plan.type_k, type_v=plan.type_v,
                flash_attn="on" if plan.flash_attn else "off", max_queue=self.max_queue, op_offload=plan.op_offload,
                drafter=drafter,
            )
        except BaseException:
            if drafter is not None:
                drafter.close()
            native.close()
            raise
        template = self.template or ChatTemplate(model.header.chat_template)
        return Served(model.name, model.header, native, engine, template, plan,
                      time.monotonic(), draft.cpu if draft else 0)

    def _make_room(self, needed: int, budget: int) -> None:
        """Unload idle models, least recently used first, until ``needed`` more bytes of RAM fit."""
        used = sum(s.ram for s in self._loaded.values())
        for name, served in sorted(self._loaded.items(), key=lambda kv: kv[1].last_used):
            if used + needed <= budget:
                return
            if not served.engine.busy:
                used -= served.ram
                self._loaded.pop(name).close()

    def unload_idle(self) -> None:
        now = time.monotonic()
        with self._lock:
            for name, served in list(self._loaded.items()):
                if not served.engine.busy and now - served.last_used > self.keep_alive:
                    self._loaded.pop(name).close()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for served in self._loaded.values():
                served.close()
            self._loaded.clear()
