"""The training loop: rows of tokens through the adapted model, AdamW on the adapter, checkpoints
that a killed or stopped run resumes from with the same data order and loss curve.

What makes it faster and leaner than a generic trainer on the same model, batch and length: the
output head runs only on the tokens the loss is taken on, not on every position (the logits over
a vocabulary are a large part of a small model's work and memory); rows may be packed with several
examples each (every example keeps its own positions, and transformers' attention mask keeps it
from attending to its neighbours), so little is padding; and model.py keeps the base in bf16 where
the CPU multiplies bf16 in hardware.

A run lives in one folder: ``run.json`` (what was asked), ``checkpoints/step-NNNNNN/`` (adapter,
optimizer and loop state, each written whole or not at all; the last two are kept) and, at the
end, ``adapter/`` (a PEFT folder with ``edgellm-run.json``, its record).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import Cancelled, StorageError, TrainingError, UsageError
from edgellm.fsutil import atomic_dir, atomic_write_text
from edgellm.train.data import Example, Examples, packed_rows

#: checkpoints kept in a run's folder (older ones are removed once a newer one is whole)
KEEP_CHECKPOINTS = 2
RECORD = "edgellm-run.json"


@dataclass(frozen=True)
class LoopSettings:
    """How the loop runs (what memory depends on is the planner's TrainSettings)."""

    lr: float = 2e-4
    batch: int = 4
    max_len: int = 1024
    epochs: float | None = None
    steps: int | None = None
    warmup: float = 0.03  # share of the steps the learning rate ramps up over
    weight_decay: float = 0.0
    pack: bool = True
    seed: int = 0
    save_every: int = 50
    eval_every: int = 0  # 0: before the first step and after the last only
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # a key of OPTIMIZERS

    def total_steps(self, per_epoch: int) -> int:
        """The run's steps: --steps, or the epochs' worth of ``per_epoch`` steps."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(per_epoch * (self.epochs if self.epochs is not None else 1.0)))


def _bnb(name: str) -> Callable[[list, float, float], Any]:
    def make(params: list, lr: float, weight_decay: float) -> Any:
        import bitsandbytes as bnb

        return getattr(bnb.optim, name)(params, lr=lr, weight_decay=weight_decay)

    return make


def _adamw(params: list, lr: float, weight_decay: float) -> Any:
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


#: the optimizers a run may use (the planner's OPTIMIZER_BYTES sizes each): torch's AdamW, and
#: bitsandbytes' 8-bit one (a quarter of the state) and paged ones (state that a GPU can page out)
OPTIMIZERS: dict[str, Callable[[list, float, float], Any]] = {
    "adamw": _adamw,
    "adamw-8bit": _bnb("AdamW8bit"),
    "paged-adamw": _bnb("PagedAdamW"),
    "paged-adamw-8bit": _bnb("PagedAdamW8bit"),
}


# -- what the loop reports ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """One optimizer step done."""

    step: int
    total: int
    loss: float
    lr: float
    tokens: int  # tokens seen so far (padding excluded)
    tokens_per_second: float
    memory: int  # bytes: peak resident memory (CPU) or peak allocated (GPU)
    eta_seconds: float
    epoch: float


@dataclass(frozen=True)
class Evaluated:
    step: int
    eval_loss: float


@dataclass(frozen=True)
class Saved:
    step: int
    path: Path


Event = Progress | Evaluated | Saved


@dataclass
class History:
    """The loss curve so far: what a resumed run continues, and what the record keeps."""

    losses: list[float] = field(default_factory=list)  # one per step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Outcome:
    adapter: Path
    steps: int
    history: History
    peak_memory: int
    tokens_per_second: float


# -- rows and batches --------------------------------------------------------------------------------
def rows_of(examples: Sequence[Example], max_len: int, pack: bool) -> list[list[int]]:
    """Example indices per row: packed several to a row, or one each."""
    if pack:
        return packed_rows([len(e) for e in examples], max_len)
    return [[i] for i in range(len(examples))]


def order(n_rows: int, epoch: int, seed: int) -> list[int]:
    """The rows' order in an epoch: a function of the seed and epoch alone, so a resumed run sees
    the same batches it would have."""
    import numpy as np

    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_rows)]


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> tuple[Any, Any, Any, int]:
    """(input ids, position ids, targets, real tokens) for a batch of rows. Positions restart at
    each example, which is what keeps packed examples from attending to each other; a target is
    the next token of the same example where that token is learned, else -100."""
    import torch

    width = max(sum(len(e) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e)
            ids[r, at : at + n] = torch.tensor(e.ids)
            positions[r, at : at + n] = torch.arange(n)
            nxt = torch.tensor(e.ids[1:])
            keep = torch.tensor(e.trained[1:], dtype=torch.bool)
            targets[r, at : at + n - 1] = torch.where(keep, nxt, torch.full_like(nxt, -100))
            at += n
        positions[r, at:] = torch.arange(width - at)  # padding: a sequence of its own, never learned
        real += at
    return ids, positions, targets, real


def loss_of(model: Any, ids: Any, positions: Any, targets: Any) -> tuple[Any, int]:
    """(summed cross-entropy over the learned tokens, their count), the output head run on those
    tokens only. Summed, so batches split over processes weigh each token alike."""
    import torch.nn.functional as F

    base = model.get_base_model()
    hidden = base.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    keep = targets != -100
    count = int(keep.sum())
    if not count:  # a process given no learned token still takes part in the step
        return hidden.sum() * 0.0, 0
    logits = base.get_output_embeddings()(hidden[keep]).float()
    cap = getattr(base.config, "final_logit_softcapping", None)
    if cap:
        logits = (logits / cap).tanh() * cap
    return F.cross_entropy(logits, targets[keep], reduction="sum"), count


def _loss_module(model: Any) -> Any:
    """The loss as a module's forward: what data parallelism wraps (its gradient hooks are set up
    by a forward through the wrapper)."""
    import torch

    class Loss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, positions: Any, targets: Any) -> tuple[Any, int]:
            return loss_of(self.model, ids, positions, targets)

    return Loss()


class Ranks:
    """This process alone, or one of ``WORLD_SIZE`` that accelerate's launcher started (``finetune
    --devices N``): each takes its share of a step's rows, accelerate averages the gradients (gloo
    on CPUs, NCCL on GPUs), and the first process alone reports and writes."""

    def __init__(self, dev: str) -> None:
        from edgellm.train.model import world_size

        self.world = world_size()
        self.accel: Any = None
        if self.world > 1:
            from accelerate import Accelerator

            self.accel = Accelerator(cpu=dev == "cpu")
        self.rank = self.accel.process_index if self.accel else 0
        self.main = self.rank == 0

    def prepare(self, module: Any, optimizer: Any) -> tuple[Any, Any]:
        return self.accel.prepare(module, optimizer) if self.accel else (module, optimizer)

    def total(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if not self.accel:
            return list(values)
        import torch

        return self.accel.reduce(
            torch.tensor(values, dtype=torch.float64, device=self.accel.device), "sum"
        ).tolist()

    def barrier(self) -> None:
        if self.accel:
            self.accel.wait_for_everyone()


# -- memory --------------------------------------------------------------------------------------------
def peak_memory(dev: str) -> int:
    if dev.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoints(run: Path) -> list[Path]:
    """A run's whole checkpoints, oldest first."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit() and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(
    run: Path, step: int, model: Any, optimizer: Any, history: History, identity: dict
) -> Path:
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    dest = run / "checkpoints" / f"step-{step:06d}"
    if dest.exists():
        return dest
    try:
        with atomic_dir(dest) as tmp:
            state = {
                k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()
            }
            save_file(state, str(tmp / "adapter.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(
                json.dumps({"step": step, "identity": identity, "history": asdict(history)}), encoding="utf-8"
            )
    except OSError as exc:
        raise StorageError(
            f"cannot write a checkpoint in {run}: {exc.strerror or exc}",
            hint="free some disk space, then resume with --resume",
        ) from None
    for old in checkpoints(run)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return dest


def load_checkpoint(path: Path, model: Any, optimizer: Any, identity: dict) -> tuple[int, History]:
    """A checkpoint's step and history, its adapter and optimizer state put back; refused when it
    was made with other data or settings (the order and curve would not continue)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        saved = state["identity"]
        step = int(state["step"])
        history = History(**{k: v for k, v in state["history"].items() if k in History.__dataclass_fields__})
        history.eval_losses = [(int(s), float(v)) for s, v in history.eval_losses]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"cannot resume from {path}: {exc}") from None
    changed = sorted(k for k in identity if saved.get(k) != identity[k])
    if changed:
        raise UsageError(
            f"cannot resume {path.parent.parent.name}: {', '.join(changed)} changed since it started",
            hint="resume with the same data and settings, or start a new run with --name",
        )
    try:
        set_peft_model_state_dict(model, load_file(str(path / "adapter.safetensors")))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    except Exception as exc:  # a damaged checkpoint: torch and safetensors raise many kinds
        raise TrainingError(f"cannot resume from {path}: {type(exc).__name__}: {exc}") from None
    return step, history


# -- the loop ---------------------------------------------------------------------------------------------
def learning_rate(step: int, total: int, settings: LoopSettings) -> float:
    """Linear warm-up, then linear decay to zero (transformers' default schedule)."""
    warm = max(1, round(total * settings.warmup)) if settings.warmup > 0 else 0
    if step < warm:
        return settings.lr * (step + 1) / warm
    return settings.lr * max(0.0, (total - step) / max(total - warm, 1))


def evaluate(model: Any, examples: Examples, settings: LoopSettings, pad_id: int, dev: str) -> float:
    import torch

    rows = rows_of(examples.examples, settings.max_len, settings.pack)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), settings.batch):
            batch = [[examples.examples[k] for k in row] for row in rows[i : i + settings.batch]]
            ids, positions, targets, _ = collate(batch, pad_id)
            summed, n = loss_of(model, ids.to(dev), positions.to(dev), targets.to(dev))
            total += summed.item()
            count += n
    model.train()
    return total / max(count, 1)


def train(
    model: Any,
    data: Examples,
    run: Path,
    settings: LoopSettings,
    *,
    dev: str,
    pad_id: int,
    identity: dict,
    record: dict,
    eval_data: Examples | None = None,
    resume: bool = False,
    on_event: Callable[[Event], None] | None = None,
    cancel: threading.Event | None = None,
) -> Outcome:
    """Train ``model``'s adapter on ``data``; the adapter is written to ``run/adapter``.

    ``identity`` (the data's hash, the base, the settings the order and curve depend on) is what a
    resumed run must match; ``record`` is written beside the adapter with the final figures."""
    import torch

    cancel = cancel or threading.Event()
    ranks = Ranks(dev)
    emit = on_event if on_event is not None and ranks.main else (lambda _e: None)
    rows = rows_of(data.examples, settings.max_len, settings.pack)
    per_step = settings.batch * ranks.world  # rows a step takes over every process
    per_epoch = math.ceil(len(rows) / per_step)
    total = settings.total_steps(per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = OPTIMIZERS[settings.optimizer](params, settings.lr, settings.weight_decay)
    step, history = 0, History()
    if resume:
        found = checkpoints(run)
        if not found:
            raise UsageError(
                f"run {run.name} has no checkpoint to resume from", hint="start it without --resume"
            )
        step, history = load_checkpoint(found[-1], model, optimizer, identity)
    if step >= total:
        raise UsageError(f"run {run.name} already did its {total} steps", hint="export it, or raise --steps")
    loss_module, optimizer = ranks.prepare(_loss_module(model), optimizer)
    if eval_data is not None and step == 0 and ranks.main:  # where the curve starts, so a fall shows
        history.eval_losses.append((0, evaluate(model, eval_data, settings, pad_id, dev)))
        emit(Evaluated(0, history.eval_losses[-1][1]))
    model.train()
    started, session_tokens, last_saved, session_from = time.monotonic(), 0, step, step

    def save() -> None:
        if ranks.main:
            emit(Saved(step, save_checkpoint(run, step, model, optimizer, history, identity)))
        ranks.barrier()

    def stop(error: Exception) -> None:
        if step > last_saved:
            save()
        raise error

    while step < total:
        epoch, index = divmod(step, per_epoch)
        chosen = order(len(rows), epoch, settings.seed)[index * per_step : (index + 1) * per_step]
        mine = chosen[ranks.rank :: ranks.world] or chosen[:1]  # a short last step: a row, its loss unweighed
        batch = [[data.examples[k] for k in rows[r]] for r in mine]
        ids, positions, targets, real = collate(batch, pad_id)
        if not chosen[ranks.rank :: ranks.world]:
            targets.fill_(-100)
            real = 0
        lr = learning_rate(step, total, settings)
        for group in optimizer.param_groups:
            group["lr"] = lr
        summed, count = loss_module(ids.to(dev), positions.to(dev), targets.to(dev))
        # one exchange a step: a stop asked for anywhere, and the step's learned tokens and loss
        stopping, tokens, real_all, loss_all = ranks.total(float(cancel.is_set()), count, real, summed.item())
        if stopping:
            stop(
                Cancelled(
                    f"training stopped at step {step} of {total}; the checkpoint is kept",
                    hint=f"continue with the same command and --resume (run {run.name})",
                )
            )
        value = loss_all / max(tokens, 1)
        if not math.isfinite(value):
            stop(
                TrainingError(
                    f"the loss became {'NaN' if math.isnan(value) else 'infinite'} at step {step}",
                    hint="lower --lr, then start again",
                )
            )
        # the gradient of the mean over every process's tokens (accelerate averages over processes)
        loss = summed * (ranks.world / max(tokens, 1))
        if ranks.accel:
            ranks.accel.backward(loss)
        else:
            loss.backward()
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        session_tokens += int(real_all)
        history.losses.append(value)
        history.tokens += int(real_all)
        elapsed = time.monotonic() - started
        rate = session_tokens / max(elapsed, 1e-9)
        eta = elapsed / max(step - session_from, 1) * (total - step)
        emit(Progress(step, total, value, lr, history.tokens, rate, peak_memory(dev), eta, step / per_epoch))
        due_eval = eval_data is not None and settings.eval_every and step % settings.eval_every == 0
        if (due_eval or (eval_data is not None and step == total)) and ranks.main:
            history.eval_losses.append((step, evaluate(model, eval_data, settings, pad_id, dev)))
            emit(Evaluated(step, history.eval_losses[-1][1]))
        if step % settings.save_every == 0 and step < total:
            history.seconds += time.monotonic() - started
            started, session_tokens, session_from = time.monotonic(), 0, step
            save()
            last_saved = step
    history.seconds += time.monotonic() - started
    figures = {
        "steps": step,
        "final_loss": history.losses[-1],
        "eval_losses": history.eval_losses,
        "tokens": history.tokens,
        "seconds": round(history.seconds, 2),
        "peak_memory": peak_memory(dev),
        "devices": ranks.world,
    }
    adapter = run / "adapter"
    if ranks.main:
        adapter = write_adapter(model, run, {**record, **figures})
    ranks.barrier()
    return Outcome(adapter, step, history, peak_memory(dev), history.tokens / max(history.seconds, 1e-9))


def write_adapter(model: Any, run: Path, record: dict) -> Path:
    """The adapter as a PEFT folder (loadable by PEFT as it is) with the run's record inside."""
    dest = run / "adapter"
    if dest.exists():
        shutil.rmtree(dest)  # a resumed run's adapter replaces the one a finished run left
    try:
        with atomic_dir(dest) as tmp:
            model.save_pretrained(tmp)
            (tmp / RECORD).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    except OSError as exc:
        raise StorageError(f"cannot write the adapter in {run}: {exc.strerror or exc}") from None
    return dest


def write_run(run: Path, settings: dict) -> None:
    """What a run was asked to do, before it starts (the app and --resume read it)."""
    try:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "run.json", json.dumps(settings, indent=1, default=str))
    except OSError as exc:
        raise StorageError(f"cannot write run {run}: {exc.strerror or exc}") from None


def read_record(adapter: Path) -> dict:
    try:
        record = json.loads((Path(adapter) / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {Path(adapter) / RECORD}: {exc}") from None
    return record if isinstance(record, dict) else {}
