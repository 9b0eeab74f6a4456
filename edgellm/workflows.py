"""What takes a model from the Hub or a folder into the store: download, merge adapters, convert,
quantize, and the quantization sweep. One place, called alike by the CLI and the app.

Each workflow reports through one ``Job``: every stage's progress arrives as a ``Step`` (what,
how far, in bytes or tensors), and a cancelled job stops at the next step with ``Cancelled``,
leaving nothing half-written in the store (each stage below writes through a temporary file).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgellm.errors import Cancelled, UsageError

if TYPE_CHECKING:
    from edgellm.convert.writer import ConvertResult
    from edgellm.eval import EvalResult
    from edgellm.gguf.header import GGUFHeader
    from edgellm.gguf.quant_types import QuantType
    from edgellm.imatrix import ImportanceMatrix
    from edgellm.models.hub import GGUFChoice, RepoListing
    from edgellm.models.store import ModelEntry, Store
    from edgellm.options import LoadOptions
    from edgellm.plan.fit import Plan
    from edgellm.quantize import QuantizeResult
    from edgellm.system.hardware import Hardware


@dataclass(frozen=True)
class Step:
    """Where a job is: ``stage`` (download, convert, quantize, evaluate) ``done`` of ``total``
    ``unit``s (bytes or tensors; total None when not yet known), and the file or tensor in hand."""

    stage: str
    done: int
    total: int | None
    unit: str = "bytes"
    detail: str = ""


@dataclass
class Job:
    """Progress out, cancel in: ``on_step`` hears every Step; setting ``cancel`` stops the job."""

    on_step: Callable[[Step], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def step(self, stage: str, done: int, total: int | None, unit: str = "bytes", detail: str = "") -> None:
        if self.cancel.is_set():
            raise Cancelled(f"{stage} cancelled; nothing was added to the store")
        if self.on_step is not None:
            self.on_step(Step(stage, done, total, unit, detail))

    def bytes_of(self, stage: str) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for a download."""
        return lambda done, total: self.step(stage, done, total)

    def tensors_of(self, stage: str) -> Callable[..., None]:
        """A converter's ``progress(i, n, bytes done, bytes total, name)`` callback."""
        return lambda i, n, done, total, name: self.step(stage, done, total, "bytes", f"{i}/{n} {name}")


# -- planning before anything is fetched ---------------------------------------------------------
# Each plan takes the settings a model would load with (LoadOptions: context, K/V types, GPU layers);
# None plans with the defaults.
def plan_remote_gguf(ref: str, store: Store, hardware: Hardware, revision: str | None = None,
                     load: LoadOptions | None = None) -> tuple[GGUFChoice, Plan]:
    """The quantization REPO[:QUANT] names and whether it fits, from its remote header alone."""
    from edgellm.models.hub import remote_header
    from edgellm.plan.fit import fit_load

    choice, header = remote_header(ref, store, revision)
    return choice, fit_load(header, hardware, load)


def plan_quants(repo: str, listing: RepoListing, store: Store, hardware: Hardware,
                load: LoadOptions | None = None) -> dict[str, Plan]:
    """Whether each GGUF quantization of a listed repo fits, before any is downloaded. One header
    is read (the default pick's: a few MiB of range requests); every other file is planned as the
    same model with that file's weights, each part in proportion (the KV cache and the compute
    buffers depend on the model, not on how its weights are quantized)."""
    from edgellm.models.hub import choose, listed_header
    from edgellm.plan.fit import fit_load
    from edgellm.plan.memory import ModelShape

    read = choose(listing.gguf, None, repo)
    header = listed_header(repo, listing, read, store)
    shape = ModelShape.from_header(header)
    metadata = header.file_size - shape.weight_bytes  # the same vocabulary and keys in every file
    return {quant: fit_load(shape if choice is read else shape.resized(max(choice.size - metadata, 0)), hardware, load)
            for quant, choice in listing.gguf.items()}


def plan_checkpoint(repo: str, listing: RepoListing, store: Store, hardware: Hardware, target: str = "F16") -> Plan:
    """Whether a safetensors repo converted to ``target`` fits, from its config and tensor shapes
    (two small downloads): the planner sees the header conversion would write."""
    from edgellm.models.hub import remote_checkpoint

    return plan_conversion(*remote_checkpoint(repo, listing, store), hardware, target)


def plan_conversion(config: dict, shapes: dict[str, tuple[int, ...]], hardware: Hardware, target: str = "F16",
                    load: LoadOptions | None = None) -> Plan:
    """Whether a checkpoint (its config and tensor shapes, already in hand) converted to ``target``
    fits this machine."""
    return plan_conversions(config, shapes, [target], hardware, load)[target][1]


def plan_conversions(config: dict, shapes: dict[str, tuple[int, ...]], targets: Sequence[str], hardware: Hardware,
                     load: LoadOptions | None = None) -> dict[str, tuple[int, Plan]]:
    """The size of the GGUF each target (F16, Q4_K_M, ...) would make of a checkpoint, and whether
    it fits, from the header conversion would write: its real parameter count, whatever the
    checkpoint's dtype (an F32 checkpoint is not twice the size of its F16 conversion)."""
    from edgellm.convert.core import planned_header
    from edgellm.plan.fit import fit_load

    headers = {target: planned_header(config, shapes, target) for target in targets}
    return {target: (header.file_size, fit_load(header, hardware, load)) for target, header in headers.items()}


# -- download --------------------------------------------------------------------------------------
def pull_gguf(ref: str, store: Store, job: Job, *, name: str | None = None, revision: str | None = None,
              on_choice: Callable[[GGUFChoice, bool], None] | None = None) -> ModelEntry:
    """REPO[:QUANT] into the store (a GGUF repo)."""
    from edgellm.models.hub import pull

    return pull(ref, store, name, revision, on_choice, job.bytes_of("download"))


def fetch_checkpoint(source: str | Path, store: Store, keep_in: Path, job: Job,
                     listing: RepoListing | None = None) -> Path:
    """A checkpoint folder: ``source`` itself when it is one, else the Hub repo it names, downloaded
    into the Hub cache and linked from ``keep_in`` (so ``edgellm convert NAME`` finds it later)."""
    from edgellm.models.hub import list_repo, parse_ref, pull_checkpoint

    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder
    if "/" not in str(source) and (keep_in / str(source) / "config.json").is_file():
        return keep_in / str(source)  # one pulled before, by its name
    repo, _ = parse_ref(str(source))
    listing = listing or list_repo(repo, None, store)
    if not listing.is_checkpoint:
        raise UsageError(f"{repo} has no safetensors checkpoint to convert")
    return pull_checkpoint(repo, listing, store, keep_in, job.bytes_of(f"download {repo}"))


def remove_model(store: Store, name: str) -> tuple[str, int]:
    """Remove a model from the store, and a pulled model's copy in the Hub cache with it (the
    bytes are freed, not left behind under ~/.cache). Returns (name, cache files removed)."""
    from edgellm.errors import EdgeLLMError
    from edgellm.models.hub import cached_copies

    try:
        copies = cached_copies(store.get(name))
    except EdgeLLMError:  # a damaged model: its manifest cannot say where it came from
        copies = []
    removed = store.remove(name)
    for path in copies:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return removed, len(copies)


# -- convert, merge, quantize ------------------------------------------------------------------------
def convert_checkpoint(store: Store, source: Path, job: Job, *, outtype: str = "auto", quant: str | None = None,
                       name: str | None = None, lora: Sequence[Path] = (), source_repo: str | None = None
                       ) -> tuple[ConvertResult, ModelEntry]:
    """A checkpoint folder into a new store entry, ``<folder>-<type>`` unless ``name``, with the
    ``lora`` adapter folders merged on the way. With ``quant`` (Q4_K_M, ...) the conversion goes to a
    temporary GGUF beside the store and only its quantization is kept."""
    from edgellm.convert.checkpoint import Checkpoint
    from edgellm.convert.core import convert, default_name, outtype_for, temporary_gguf
    from edgellm.gguf.header import read_header
    from edgellm.gguf.quant_types import quant_type

    with Checkpoint.open(Path(source)) as ckpt:
        qtype, n_params = outtype_for(outtype, ckpt), sum(math.prod(r.shape) for r in ckpt.tensors.values())
    label = default_name(source, qtype.name, lora)
    origin = f"convert:{Path(source).resolve()}" + "".join(f"+lora:{Path(p).resolve()}" for p in lora)
    options: dict[str, Any] = {"lora": lora, "source_repo": source_repo, "progress": job.tensors_of("convert"),
                               "cancel": job.cancel}
    if quant is None:
        done: list[ConvertResult] = []
        entry = store.create(name or label, f"{label}.gguf", origin,
                             lambda dest: done.append(convert(source, dest, qtype.name, **options)),
                             expected_size=int(n_params * _bytes_per_weight(qtype)))
        return done[0], entry
    target = quant_type(quant)
    with temporary_gguf(source, store.root, f"{label}.gguf", qtype.name, **options) as result:
        _, entry = quantize_into_store(store, label, read_header(result.path), target, job, name=name,
                                       source=f"{origin}:{target.name}")
    return result, entry


def _bytes_per_weight(qtype: Any) -> float:
    """Of a gguf-py tensor type (the converter's output types)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size / block


def pull_and_convert(repo: str, listing: RepoListing, store: Store, keep_in: Path, job: Job, *,
                     quant: str | None = None, lora: Sequence[str | Path] = (), name: str | None = None
                     ) -> tuple[ConvertResult, ModelEntry, Path]:
    """A safetensors repo into the store: download it and each adapter (a repo or a local folder),
    convert merging the adapters, quantize when ``quant``. Returns the kept checkpoint folder too."""
    folder = fetch_checkpoint(repo, store, keep_in, job, listing)
    adapters = [fetch_checkpoint(ref, store, keep_in, job) for ref in lora]
    result, entry = convert_checkpoint(store, folder, job, quant=quant, lora=adapters, name=name, source_repo=repo)
    return result, entry, folder


def quantize_into_store(store: Store, model_name: str, header: GGUFHeader, qtype: QuantType, job: Job, *,
                        name: str | None = None, source: str | None = None, **options: Any
                        ) -> tuple[QuantizeResult, ModelEntry]:
    """A GGUF quantized into a new store entry (``<model>-<type>`` unless ``name``); ``options`` as
    quantize() takes them (threads, pure, output_tensor_type, ...)."""
    from edgellm.quantize import quantize_to_store

    return quantize_to_store(store, model_name, header, qtype, name, source, on_tensor=_tensors(job, qtype),
                             cancel=job.cancel, **options)


def quantize_file(header: GGUFHeader, qtype: QuantType, output: Path, job: Job, **options: Any) -> QuantizeResult:
    """A GGUF quantized into the file ``output``; ``options`` as quantize_into_store()."""
    from edgellm.quantize import quantize

    return quantize(header, qtype, output, on_tensor=_tensors(job, qtype), cancel=job.cancel, **options)


def _tensors(job: Job, qtype: QuantType) -> Callable[[int, int, str], None]:
    return lambda index, total, tensor: job.step(f"quantize {qtype.name}", index, total, "tensors", tensor)


@contextlib.contextmanager
def gguf_of(source: Path, store: Store, job: Job) -> Iterator[tuple[str, Path]]:
    """(name, GGUF path) for a checkpoint folder, converted to a temporary GGUF in the store's folder
    that is gone when the block ends: for a model only converted to be quantized."""
    from edgellm.convert.core import temporary_gguf

    name = Path(os.path.abspath(source)).name.lower()  # the name the user sees, even through a link
    with temporary_gguf(source, store.root, f"{name}.gguf", progress=job.tensors_of("convert"),
                        cancel=job.cancel) as result:
        yield name, result.path


# -- importance matrices ----------------------------------------------------------------------------
def make_imatrix(model_path: Path, text: str, output: Path, job: Job, *, dataset: str = "", n_ctx: int = 512,
                 chunks: int | None = None, threads: int | None = None, n_gpu_layers: int = 0,
                 process_output: bool = False) -> ImportanceMatrix:
    """The importance matrix of the model at ``model_path`` on ``text``, saved at ``output`` in
    llama-imatrix's format; progress in tokens, with the rate in the step's detail."""
    from edgellm.imatrix import compute_imatrix

    def progress(done: int, total: int, rate: float) -> None:
        job.step("importance matrix", done * n_ctx, total * n_ctx, "tokens", f"{rate:.0f} tok/s")

    from edgellm.fsutil import atomic_path

    with atomic_path(Path(output)) as tmp:  # a destination that cannot be written is said before the work
        matrix = compute_imatrix(model_path, text, n_ctx=n_ctx, chunks=chunks, threads=threads,
                                 n_gpu_layers=n_gpu_layers, dataset=dataset, process_output=process_output,
                                 on_progress=progress, cancel=job.cancel)
        matrix.write(tmp)
    matrix.path = Path(output)
    return matrix


def calibrated_imatrix(store: Store, model_name: str, header: GGUFHeader, job: Job, *, text: str | None = None,
                       dataset: str = "", n_ctx: int = 512, chunks: int | None = None,
                       threads: int | None = None) -> ImportanceMatrix:
    """An importance matrix of a model on a calibration text (edgellm's own unless ``text``), made
    once and kept in the store's ``.imatrix`` folder for every later quantization of that model
    (a sweep quantizes to several types from one matrix)."""
    import hashlib

    from edgellm.imatrix import calibration_text, gpu_layers_for, load_imatrix

    if text is None:
        text, dataset = calibration_text(), "edgellm calibration text"
    key = f"{model_name}\0{header.file_size}\0{n_ctx}\0{chunks}\0{text}"
    path = store.root / ".imatrix" / f"{model_name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.gguf"
    if path.is_file():
        return load_imatrix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return make_imatrix(header.path, text, path, job, dataset=dataset, n_ctx=n_ctx, chunks=chunks,
                        threads=threads, n_gpu_layers=gpu_layers_for(header, n_ctx))


# -- the quantization sweep --------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepRow:
    """One model of a sweep: its size, quality against the base, and decode speed."""

    label: str
    quant: str  # the type, or "base"
    imatrix: bool
    size: int
    bits_per_weight: float
    quality: EvalResult
    tokens_per_second: float

    def as_dict(self) -> dict[str, Any]:
        q = self.quality
        return {"type": self.quant, "imatrix": self.imatrix, "size": self.size,
                "bits_per_weight": round(self.bits_per_weight, 4), "perplexity": q.perplexity,
                "perplexity_stderr": q.perplexity_stderr, "kl_divergence": q.kl_mean,
                "top1_agreement": q.top1_agreement, "tokens_per_second": round(self.tokens_per_second, 2)}


def sweep(store: Store, model_name: str, header: GGUFHeader, types: Sequence[QuantType], text: str, job: Job, *,
          n_ctx: int = 512, threads: int | None = None, chunks: int | None = None,
          imatrix: ImportanceMatrix | None = None, **options: Any) -> list[SweepRow]:
    """Quantize to each type (or reuse the store's model made the same way), then measure every
    model's size, perplexity and KL divergence against the base on ``text``, and its decode speed.
    With ``imatrix`` each type is made twice, with and without it (once, with it, for the types
    that need one), so the ladder shows what the importance matrix buys. The rows are also kept
    in the store (``sweep_figures`` reads them) for the app to show beside each type."""
    from edgellm.bench import plan_cases, run_cases
    from edgellm.errors import ModelExistsError
    from edgellm.eval import evaluate
    from edgellm.gguf.header import read_header
    from edgellm.quantize import quantization_source, quantized_name, require_imatrix

    variants = []
    for qtype in types:
        require_imatrix(qtype, imatrix is not None)
        variants += [(qtype, None)] if not qtype.needs_imatrix else []
        variants += [(qtype, imatrix)] if imatrix is not None else []
    paths = [("base " + header.quantization, "base", False, header.path)]
    for qtype, matrix in variants:
        name = quantized_name(model_name, qtype, matrix is not None)
        if not store.exists(name):
            _, entry = quantize_into_store(store, model_name, header, qtype, job, threads=threads, imatrix=matrix,
                                           **options)
        elif (entry := store.get(name)).manifest.source != quantization_source(model_name, qtype, matrix):
            raise ModelExistsError(f"the store's {name} was made another way ({entry.manifest.source})",
                                   hint=f"remove it (edgellm rm {name}) and sweep again")
        paths.append((qtype.name + (" +imat" if matrix else ""), qtype.name, matrix is not None, entry.gguf_path))
    rows = []
    for i, (label, quant, guided, path) in enumerate(paths):
        job.step("evaluate", i, len(paths), "models", label)
        quality = evaluate(path, text, n_ctx, header.path, threads, chunks)
        speed = next(run_cases(plan_cases([path], [0], [64], [threads] if threads else []), repetitions=2))
        size = read_header(path).file_size
        rows.append(SweepRow(label, quant, guided, size, size * 8 / header.parameter_count, quality, speed.avg_ts))
    _keep_figures(store, model_name, rows)
    return rows


def _keep_figures(store: Store, model_name: str, rows: Sequence[SweepRow]) -> None:
    import json

    from edgellm.fsutil import atomic_path

    folder = store.root / ".sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{model_name}.json") as tmp:
        tmp.write_text(json.dumps([row.as_dict() for row in rows], indent=1))


def sweep_figures(store: Store, model_name: str) -> dict[tuple[str, bool], dict[str, Any]]:
    """The last sweep's figures for a model, by (type, imatrix); empty when there was none or the
    file is not one a sweep wrote (it is only data: anything odd is ignored)."""
    import json

    try:
        rows = json.loads((store.root / ".sweeps" / f"{model_name}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    figures = {}
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and isinstance(row.get("type"), str) and isinstance(row.get("imatrix"), bool):
            figures[(row["type"], row["imatrix"])] = row
    return figures


# -- fine-tuning -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finetune:
    """What ``edgellm finetune`` asks for; None means "choose" (batch, packing, checkpointing)."""

    base: str  # a checkpoint folder or a Hub repo
    data: Path
    name: str | None = None
    qlora: bool = False
    rank: int = 16
    alpha: float | None = None  # None: twice the rank
    targets: str | tuple[str, ...] = "all-linear"
    epochs: float | None = None
    steps: int | None = None
    lr: float = 2e-4
    max_len: int = 1024
    batch: int | None = None
    eval_file: Path | None = None
    eval_split: float = 0.0
    pack: bool | None = None
    gradient_checkpointing: bool | None = None
    dtype: str | None = None  # bf16 or fp32 for the base (None: bf16 where the device is fast at it)
    optimizer: str = "adamw"  # a key of train.loop.OPTIMIZERS
    seed: int = 0
    save_every: int = 50
    resume: bool = False

    def check(self) -> Finetune:
        """Settings that make no sense are refused before anything is read."""
        if not 1 <= self.rank <= 1024:
            raise UsageError(f"--rank must be 1..1024, got {self.rank}")
        if self.steps is not None and self.steps < 1:
            raise UsageError("--steps must be positive")
        if self.epochs is not None and not 0 < self.epochs <= 1000:
            raise UsageError("--epochs must be above 0 (at most 1000)")
        if not 0 < self.lr <= 1:
            raise UsageError(f"--lr must be in (0, 1], got {self.lr}")
        if self.batch is not None and self.batch < 1:
            raise UsageError("--batch must be positive")
        from edgellm.plan.training import OPTIMIZER_BYTES

        if self.optimizer not in OPTIMIZER_BYTES:
            raise UsageError(f"--optim {self.optimizer!r}: use " + ", ".join(OPTIMIZER_BYTES))
        return self


def base_config(ref: str, keep_in: Path, settings: Any) -> dict:
    """A base checkpoint's config.json: a folder, one pulled before (by name), or a Hub repo's
    (one small download), for the planner before anything big moves."""
    from edgellm.convert.checkpoint import read_config

    path = Path(ref).expanduser()
    if path.is_dir():
        return read_config(path)
    if "/" not in ref:
        if (keep_in / ref).is_dir():
            return read_config(keep_in / ref)
        raise UsageError(f"no checkpoint folder {ref}")
    from edgellm.models import store_for
    from edgellm.models.hub import list_repo, parse_ref, remote_checkpoint

    store = store_for(settings)
    repo, _ = parse_ref(ref)
    config, _ = remote_checkpoint(repo, list_repo(repo, None, store), store)
    return config


def training_memory(request: Finetune, shape: Any, hardware: Hardware, dev: str, *,
                    trained_share: float = 1.0, row_len: int | None = None,
                    most_rows: int | None = None) -> tuple[Any, tuple[str, ...]]:
    """The memory plan of a run (a plan.training.TrainPlan) and what was chosen for it: gradient
    checkpointing when it is asked to be automatic and the run does not fit without it, the largest
    batch that fits (at most ``most_rows``) when the batch is automatic. One rule for ``plan
    --finetune``, the app's verdict and the run itself. ``row_len``: the widest row a step meets
    (default --max-len); on a CPU several processes (--devices) share the RAM."""
    import dataclasses

    from edgellm.plan.training import TrainSettings, auto_batch, plan_training
    from edgellm.train.model import compute_dtype, world_size

    settings = TrainSettings(
        method="qlora" if request.qlora else "lora", rank=request.rank,
        targets=None if request.targets == "all-linear" else tuple(request.targets),
        max_len=row_len or request.max_len, batch=request.batch or 1,
        gradient_checkpointing=bool(request.gradient_checkpointing), trained_share=trained_share,
        device="cpu" if dev == "cpu" else "cuda", dtype=compute_dtype(dev, request.dtype),
        optimizer=request.optimizer)
    # each process holds its own copy: several on one machine's RAM share it, GPUs each have their own
    available = hardware.ram_available // world_size() if dev == "cpu" else (
        min(g.free for g in hardware.gpus) if hardware.gpus else 0)
    notes = []
    if request.gradient_checkpointing is None and not plan_training(shape, settings, available).fits:
        settings = dataclasses.replace(settings, gradient_checkpointing=True)
        notes.append("gradient checkpointing on: the run does not fit without it")
    if request.batch is None:
        batch = max(auto_batch(shape, settings, available), 1)
        settings = dataclasses.replace(settings, batch=min(batch, most_rows or batch))
    return plan_training(shape, settings, available), tuple(notes)


@dataclass(frozen=True)
class FinetunePlan:
    """A run made ready: the data as tokens, the memory verdict, and the settings chosen."""

    base: Path
    run: Path
    name: str
    data: Any  # train.data.Examples
    eval_data: Any | None
    memory: Any  # plan.training.TrainPlan
    loop: Any  # train.loop.LoopSettings
    padding: tuple[float, float]  # padding share padded, packed
    identity: dict[str, Any]  # what a resumed run must match
    pad_id: int
    notes: tuple[str, ...] = ()
    four_bit: bool = False  # the base ships bitsandbytes 4-bit weights


def plan_finetune(request: Finetune, store: Store, runs: Path, keep_in: Path, hardware: Hardware, job: Job
                  ) -> FinetunePlan:
    """Everything decided before a model is loaded: the data read and checked (a bad line stops it
    here), the memory planned (a run that cannot fit is refused with the nearest setting that
    fits), the run's folder and disk space checked."""
    import dataclasses
    import shutil

    from edgellm.convert.checkpoint import read_config
    from edgellm.errors import DataError, ModelExistsError, StorageError
    from edgellm.gguf.header import human_bytes
    from edgellm.models.store import check_name
    from edgellm.plan.training import MAX_AUTO_BATCH, TrainShape, nearest_fit
    from edgellm.train.data import Tokens, packed_rows, padding_share, prepare
    from edgellm.train.loop import LoopSettings, checkpoints
    from edgellm.train.model import device, prequantized, require_training

    require_training()
    base = fetch_checkpoint(request.base, store, keep_in, job)
    config = read_config(base)
    four_bit = prequantized(config)
    if four_bit and not request.qlora:
        request = dataclasses.replace(request, qlora=True)  # its 4-bit weights are what there is to train on
    shape = dataclasses.replace(TrainShape.from_config(config),
                                checkpoint_bytes=sum(f.stat().st_size for f in base.glob("*.safetensors")))
    context = int((config.get("text_config") or config).get("max_position_embeddings") or 0)
    if request.max_len < 16 or (context and request.max_len > context):
        raise UsageError(f"--max-len {request.max_len} is outside 16..{context or '?'}, the model's context")
    name = check_name(request.name or f"{base.name}-{Path(request.data).stem}".lower())
    run = runs / name
    if ((run / "adapter").is_dir() or checkpoints(run)) and not request.resume:
        done = (run / "adapter").is_dir()
        raise ModelExistsError(f"run {name} {'exists' if done else 'was stopped and has a checkpoint'}",
                               hint=(f"export it (edgellm export {name} Q4_K_M) or name a new run with --name"
                                     if done else "continue it with --resume, or name a new run with --name"))
    if request.resume and not checkpoints(run):
        raise UsageError(f"run {name} has no checkpoint to resume from", hint="start it without --resume")
    tokens = Tokens.for_checkpoint(base)
    data = prepare(request.data, tokens, request.max_len, lambda n: job.step("read data", n, None, "lines"))
    eval_data = None
    if request.eval_file is not None:
        eval_data = prepare(request.eval_file, tokens, request.max_len)
    elif request.eval_split:
        if not 0 < request.eval_split < 0.5:
            raise UsageError("--eval-split takes a share between 0 and 0.5")
        held = max(1, round(len(data.examples) * request.eval_split))
        if held >= len(data.examples):
            raise DataError(f"{request.data}: too few examples to hold {held} out for evaluation")
        data, eval_data = data.split(held, request.seed)
    dev = device()
    # rows: packed when that saves padding (judged at the batch asked for, or the most auto takes); the
    # plan is for the widest row a step can meet (a padded batch is as wide as its longest example)
    lengths = [len(e) for e in data.examples]
    padding = padding_share(lengths, request.batch or MAX_AUTO_BATCH, request.max_len)
    pack = request.pack if request.pack is not None else padding[1] < padding[0] - 0.05
    widest = max(sum(lengths[i] for i in row) for row in packed_rows(lengths, request.max_len)) if pack \
        else max(lengths)
    memory, chosen = training_memory(request, shape, hardware, dev, row_len=widest,
                                     most_rows=len(data.examples),
                                     trained_share=data.trained_tokens / max(data.tokens, 1))
    notes = ["the base is bitsandbytes 4-bit: QLoRA on its own weights"] if four_bit else []
    notes += chosen
    settings = memory.settings
    if not memory.fits:
        near = nearest_fit(shape, settings, memory.available)
        hint = ("nothing fits this machine" if near is None else
                f"try --batch {near.batch}" + (f" --max-len {near.max_len}" if near.max_len < widest else "")
                + (" --qlora" if near.method == "qlora" else "")
                + (" --gradient-checkpointing on" if near.gradient_checkpointing else ""))
        raise UsageError(f"this run needs {human_bytes(memory.total)} of {memory.where} and "
                         f"{human_bytes(memory.available)} is free", hint=hint)
    padding = padding_share(lengths, settings.batch, request.max_len)
    loop = LoopSettings(lr=request.lr, batch=settings.batch, max_len=request.max_len, epochs=request.epochs,
                        steps=request.steps, pack=pack, seed=request.seed, save_every=request.save_every,
                        optimizer=request.optimizer)
    adapter_bytes = shape.lora_params(request.rank, settings.targets) * 4
    need = adapter_bytes * 3 * (2 + 1) + (16 << 20)  # two checkpoints (adapter, AdamW's moments), the adapter
    try:
        run.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(run.parent).free
    except OSError as exc:
        raise StorageError(f"cannot write runs in {run.parent}: {exc.strerror or exc}") from None
    if free < need:
        raise StorageError(f"{run.parent} has {human_bytes(free)} free; the run's checkpoints need "
                           f"{human_bytes(need)}", hint="free some disk space or set EDGELLM_HOME elsewhere")
    identity = {"base": str(base.resolve()), "data": data.sha256, "rank": request.rank,
                "targets": str(request.targets),
                "max_len": request.max_len, "batch": settings.batch, "pack": pack, "seed": request.seed,
                "method": settings.method, "dtype": settings.compute_dtype, "optimizer": request.optimizer}
    pad_id = tokens.tokenizer.pad_token_id
    pad_id = tokens.tokenizer.eos_token_id if pad_id is None else pad_id
    return FinetunePlan(base, run, name, data, eval_data, memory, loop, padding, identity, int(pad_id or 0),
                        tuple(notes), four_bit)


def finetune(plan: FinetunePlan, request: Finetune, job: Job,
             on_event: Callable[[Any], None] | None = None) -> Any:
    """Train the planned run; returns the loop's Outcome (the adapter folder and the curve)."""
    import datetime

    from edgellm.train.loop import train, write_run
    from edgellm.train.model import adapt, device, first_process, load_base, world_size

    identity, chosen, dev = plan.identity, plan.memory.settings, device()
    record = {"base": str(plan.base.resolve()), "data": str(Path(request.data).resolve()), "data_sha256":
              identity["data"], "format": plan.data.format, "method": chosen.method,
              "dtype": chosen.compute_dtype, "base_4bit": plan.four_bit,
              "optimizer": request.optimizer, "rank": request.rank,
              "alpha": request.alpha or 2 * request.rank, "targets": request.targets,
              "lr": request.lr, "max_len": request.max_len, "batch": plan.loop.batch, "pack": plan.loop.pack,
              "trained_tokens": plan.data.trained_tokens, "masked_tokens": plan.data.masked_tokens,
              "planned_memory": plan.memory.total, "created": datetime.datetime.now(datetime.UTC).isoformat()}
    job.step("load base", 0, None, "tensors", plan.base.name)
    model = load_base(plan.base, qlora=chosen.method == "qlora", dev=dev, dtype=chosen.compute_dtype,
                      four_bit=plan.four_bit)
    model = adapt(model, rank=request.rank, alpha=record["alpha"], targets=request.targets,
                  gradient_checkpointing=chosen.gradient_checkpointing)
    if not request.resume and first_process():
        write_run(plan.run, {**record, "identity": identity, "devices": world_size()})
    return train(model, plan.data, plan.run, plan.loop, dev=dev, pad_id=plan.pad_id, identity=identity,
                 record=record, eval_data=plan.eval_data, resume=request.resume, on_event=on_event,
                 cancel=job.cancel)


def export_run(store: Store, adapter: Path, quant: str | None, job: Job, *, name: str | None = None,
               base_16bit: Path | None = None) -> tuple[ConvertResult, ModelEntry]:
    """A trained adapter merged into its base, converted, quantized to ``quant`` and registered in
    the store. A run on a bitsandbytes 4-bit checkpoint merges into those 4-bit weights,
    dequantized: the weights it was trained against, which lands far nearer the trained model
    than its 16-bit base does (bench/qlora_merge.py); ``base_16bit`` merges into that instead. A
    QLoRA run on a 16-bit base merges into it, as Unsloth does."""
    from edgellm.errors import CheckpointError
    from edgellm.train.loop import read_record

    record = read_record(adapter)
    base = Path(base_16bit or record.get("base") or "")
    if not (base / "config.json").is_file():
        raise CheckpointError(f"the base of {adapter} is not at {base or '?'}",
                              hint="name it with --base-16bit FOLDER")
    adapter = Path(adapter)
    run = adapter.parent.name if adapter.name == "adapter" else adapter.name  # a run's adapter, or any folder
    # the store's record of where it came from names the base and the adapter (convert:BASE+lora:ADAPTER)
    return convert_checkpoint(store, base, job, quant=quant, lora=[adapter],
                              name=name or f"{run}-{(quant or 'f16').lower()}")
