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
from edgellm.models import BUNDLED_NAME, ResolvedModel, load_options, resolve, store_for
from edgellm.models.hub import hub_name, pulled_name
from edgellm.models.store import NAME_RE
from edgellm.plan.fit import Plan
from edgellm.runtime.engine import Model
from edgellm.runtime.loader import load_model, resolve_load
from edgellm.runtime.templates import ChatTemplate
from edgellm.system.hardware import Hardware


@dataclass(eq=False)
class Served:
    """A model the server answers for: a Model loaded as every front end loads one (requests are
    prepared for it), with its store name and when it was last asked."""

    name: str
    model: Model
    last_used: float

    def __post_init__(self) -> None:
        self.header, self.native, self.engine = self.model.header, self.model.native, self.model.engine
        self.plan: Plan = self.model.load_options.plan

    @property
    def ram(self) -> int:
        return self.plan.memory.cpu + self.model.load_options.draft_ram

    def close(self) -> None:
        self.model.close()


class ModelPool:
    def __init__(
        self, settings: Settings, model: str | None, parallel: int, keep_alive: float, hardware: Hardware,
        max_queue: int = 64, template: str | None = None, aliases: dict[str, str] | None = None,
    ) -> None:
        """``template``: a chat template every served model uses instead of its own (--template);
        ``aliases``: other names a request may use for a served model (--alias), ``*`` for any
        name not served (clients that ask for models by their own names: Claude Code's small one)."""
        self.template = ChatTemplate(template, origin="--template") if template is not None else None
        self.settings = settings
        self.max_queue = max_queue
        self.fixed = resolve(model, settings) if model else None  # validates the file at start-up
        self.aliases = dict(aliases or {})
        for target in self.aliases.values():  # each must name a served model now, not at a request
            self._key_of(target)
        self.parallel = parallel
        self.keep_alive = keep_alive
        self.hardware = hardware
        if self.fixed:  # settings it could never load with are refused now, as `run` refuses them
            resolve_load(self.fixed.header, load_options(settings), hardware, parallel, plan=True)
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
        """The served models' names, their aliases after them."""
        served = [self.fixed.name] if self.fixed else [e.name for e in store_for(self.settings).list()]
        return served + [alias for alias in self.aliases if alias != "*"]

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

    def unload(self, name: str | None) -> None:
        """Unload a model now if it is loaded and idle (Ollama's ``keep_alive: 0``)."""
        with self._lock:
            key = self._key(name)
            served = self._loaded.get(key)
            if served is not None and not served.engine.busy:
                self._loaded.pop(key).close()

    def _key(self, name: str | None) -> str:
        """A request names a model of the store, never a file: the name is only ever looked up there.
        ``NAME:latest`` is ``NAME``, as Ollama's clients write a name without a tag, and a model
        pulled as Ollama names Hub models (``hf.co/OWNER/REPO:QUANT``) is found by that name."""
        name = self.store_name(name)
        if name in self.aliases:
            name = self.aliases[name]
        elif "*" in self.aliases and not self._serves(name):
            name = self.aliases["*"]
        return self._key_of(name)

    def store_name(self, name: str | None) -> str | None:
        """The store's name for a name as a request gives it (Ollama's forms included)."""
        if name and name.endswith(":latest") and not name.lower().startswith(("hf.co/", "huggingface.co/")):
            return name.removesuffix(":latest")
        hub = hub_name(name) if name else None
        if hub is not None:
            return pulled_name(store_for(self.settings), *hub) or name
        return name

    def _key_of(self, name: str | None) -> str:
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

    def _serves(self, name: str | None) -> bool:
        try:
            self._key_of(name)
        except ModelNotFoundError:
            return False
        return True

    def _load(self, key: str) -> Served:
        model = self.fixed or resolve(key, self.settings, store_only=True)
        if not model.path.is_file():  # removed (edgellm rm) while served
            raise ModelNotFoundError(f"model {model.name} is gone: {model.path.name} was removed",
                                     hint="import or pull it again, or restart the server with another model")
        options = load_options(self.settings)
        load = resolve_load(model.header, options, self.hardware, self.parallel, plan=True)
        self._make_room(load.plan.memory.cpu + load.draft_ram, load.plan.ram_budget)
        loaded = load_model(model.path, options, self.template, model.header, self.hardware, n_seq=self.parallel,
                            threaded=True, max_queue=self.max_queue, load=load)
        return Served(model.name, loaded, time.monotonic())

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
