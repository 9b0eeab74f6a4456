"""Ollama's model-management routes, which people script against Ollama: pull (a Hugging Face Hub
GGUF repo named as Ollama names one, ``hf.co/OWNER/REPO[:QUANT]``), delete, copy, and create (from
a model of the store, a GGUF file or a safetensors folder on the server's machine, quantized on
the way). They pass the same guard as every route (the API key when one is set, the Origin check).

Each runs the library's own workflow (workflows.py) in a worker thread; its steps stream as
Ollama's progress lines (``stream`` true, the default) and the last line says ``success``. A
client that leaves cancels the job, and the store is left as it was: a model appears in it only
once it is whole.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import Field, StrictBool, StrictStr

from edgellm.errors import EdgeLLMError, ModelNotFoundError, UsageError, brief
from edgellm.models import store_for
from edgellm.models.store import Store, check_name
from edgellm.server.bodies import ollama_error
from edgellm.server.schemas import MAX_NAME, Body
from edgellm.server.streaming import EventStream
from edgellm.workflows import Job, Step

router = APIRouter(prefix="/api")
#: the error bodies this API's clients read
ERRORS = ollama_error

Name = Annotated[StrictStr, Field(max_length=MAX_NAME)]


class PullRequest(Body):
    model: Name | None = None
    name: Name | None = None  # Ollama's older field
    stream: StrictBool = True


class DeleteRequest(Body):
    model: Name | None = None
    name: Name | None = None


class CopyRequest(Body):
    source: Name
    destination: Name


class CreateRequest(Body):
    model: Name | None = None
    name: Name | None = None
    from_: StrictStr | None = Field(None, alias="from", max_length=4096)
    quantize: Name | None = None
    stream: StrictBool = True
    #: Ollama's blobs and Modelfile settings, which this server does not take (refused by name)
    files: dict[str, Any] | None = None
    adapters: dict[str, Any] | None = None
    modelfile: StrictStr | None = None


@router.post("/pull")
async def pull(body: PullRequest, request: Request):
    from edgellm.models.hub import hub_name

    given = body.model or body.name or ""
    hub = hub_name(given)
    if hub is None:
        raise UsageError(f"{brief(given)} is not a Hugging Face Hub model; this server pulls GGUF repos named "
                         "hf.co/OWNER/REPO[:QUANT]", hint="for example hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M")
    repo, quant = hub
    settings = request.app.state.pool.settings
    chosen: dict[str, Any] = {}

    def work(job: Job) -> None:
        from edgellm.workflows import pull_gguf

        ref = f"{repo}:{quant}" if quant else repo
        pull_gguf(ref, store_for(settings), job, on_choice=lambda choice, _: chosen.update(choice=choice))

    def line(step: Step) -> dict:
        sha = chosen["choice"].files[0].sha256 if "choice" in chosen else None
        digest = f"sha256:{sha}" if sha else ""
        return {"status": f"pulling {digest[7:19] or repo}", "digest": digest, "total": step.total or 0,
                "completed": step.done}

    return await _respond(work, line, body.stream, first=["pulling manifest"],
                          last=["verifying sha256 digest", "writing manifest", "success"])


@router.delete("/delete")
async def delete(body: DeleteRequest, request: Request) -> Response:
    from edgellm.workflows import remove_model

    pool = request.app.state.pool
    name = _existing(pool, body.model or body.name)
    await asyncio.to_thread(pool.unload, name)
    await asyncio.to_thread(remove_model, store_for(pool.settings), name)
    return Response(status_code=200)


@router.post("/copy")
async def copy(body: CopyRequest, request: Request) -> Response:
    pool = request.app.state.pool
    source = _existing(pool, body.source)
    await asyncio.to_thread(store_for(pool.settings).copy, source, _new_name(body.destination))
    return Response(status_code=200)


@router.post("/create")
async def create(body: CreateRequest, request: Request):
    for field in ("files", "adapters", "modelfile"):
        if getattr(body, field):
            raise UsageError(f"{field} is not taken here: create from a model of this server, or a GGUF file or a "
                             "safetensors folder on its machine (from), quantized with quantize")
    if not body.from_:
        raise UsageError("create needs from: a model of this server, or a GGUF file or safetensors folder on its machine")
    pool = request.app.state.pool
    settings = pool.settings
    name = _new_name(body.model or body.name or "")
    quant = _quant_type(body.quantize) if body.quantize else None
    source = _source(pool, body.from_)

    def work(job: Job) -> None:
        from edgellm import workflows
        from edgellm.gguf.header import read_header

        store = store_for(settings)
        if isinstance(source, Path) and source.is_dir():
            workflows.convert_checkpoint(store, source, job, quant=quant.name if quant else None, name=name)
        elif isinstance(source, Path):
            if quant is None:
                store.import_gguf(source, name)
            else:
                workflows.quantize_into_store(store, source.stem, read_header(source), quant, job, name=name,
                                              source=f"file:{source}:{quant.name}")
        elif quant is None:
            store.copy(source, name)
        else:
            entry = store.get(source)
            workflows.quantize_into_store(store, source, read_header(entry.gguf_path), quant, job, name=name)

    def line(step: Step) -> dict:
        stage = step.stage.replace("quantize ", "quantizing to ").replace("convert", "converting model")
        return {"status": stage, "total": step.total or 0, "completed": step.done}

    first = ["parsing GGUF" if isinstance(source, Path) and not source.is_dir() else "reading model"]
    return await _respond(work, line, body.stream, first=first, last=["writing manifest", "success"])


def _existing(pool: Any, given: str | None) -> str:
    """The store name of a model this server holds (Ollama's name forms taken), or a 404."""
    name = pool.store_name(given or "")
    if not name or not store_for(pool.settings).exists(name):
        raise ModelNotFoundError(f"model {brief(given or '')} not found", hint="GET /api/tags lists them")
    return name


def _new_name(given: str) -> str:
    """A new model's store name: Ollama's ``:latest`` tag is the name itself."""
    return check_name(given.removesuffix(":latest"))


def _quant_type(given: str) -> Any:
    from edgellm.gguf.quant_types import quant_type

    return quant_type(given.upper())


def _source(pool: Any, given: str) -> str | Path:
    """What ``from`` names: a model of this server, or an absolute path on its machine to a GGUF
    file or a safetensors folder (one with a config.json)."""
    store: Store = store_for(pool.settings)
    name = pool.store_name(given)
    if name and not given.startswith("/") and store.exists(name):
        return name
    path = Path(given)
    if not path.is_absolute():
        raise ModelNotFoundError(f"from {brief(given)}: no such model here, and not an absolute path",
                                 hint="name a model of GET /api/tags, or a GGUF file or safetensors folder by its full path")
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ModelNotFoundError(f"from {brief(given)}: not a GGUF file or a folder with a config.json")


async def _respond(work: Callable[[Job], None], line: Callable[[Step], dict], stream: bool, *,
                   first: list[str], last: list[str]):
    """Run ``work`` in a worker thread: its steps as progress lines, or one body when it is done."""
    job = Job()
    if not stream:
        try:
            await asyncio.to_thread(work, job)
        finally:
            job.cancel.set()
        return {"status": "success"}
    return EventStream(_lines(work, line, job, first, last), media_type="application/x-ndjson")


async def _lines(work: Callable[[Job], None], line: Callable[[Step], dict], job: Job, first: list[str],
                 last: list[str]) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    shown = {"at": -1.0}

    def on_step(step: Step) -> None:  # at most ten lines a second, and every stage's first and last
        now = loop.time()
        if now - shown["at"] >= 0.1 or (step.total is not None and step.done >= step.total):
            shown["at"] = now
            loop.call_soon_threadsafe(queue.put_nowait, step)

    def run() -> None:
        try:
            work(job)
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except EdgeLLMError as exc:
            loop.call_soon_threadsafe(queue.put_nowait, exc)
        except Exception as exc:  # noqa: BLE001 - the job's own failure becomes its error line
            loop.call_soon_threadsafe(queue.put_nowait, EdgeLLMError(f"{type(exc).__name__}: {exc}"))

    job.on_step = on_step
    worker = threading.Thread(target=run, name="edgellm-ollama-job", daemon=True)
    try:
        for status in first:
            yield _ndjson({"status": status})
        worker.start()
        while True:
            item = await queue.get()
            if item is None:
                break
            if isinstance(item, EdgeLLMError):  # too late for an HTTP status: an error line, as Ollama sends
                yield _ndjson({"error": str(item)})
                return
            yield _ndjson(line(item))
        for status in last:
            yield _ndjson({"status": status})
    finally:
        job.cancel.set()  # a client gone: the job stops at its next step, and the store keeps nothing of it


def _ndjson(data: dict) -> bytes:
    return (json.dumps(data, ensure_ascii=False) + "\n").encode()
