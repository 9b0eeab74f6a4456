"""Choose GPU layers, context and K/V cache types together so that a model fits the machine.

The rules, in order:
- a fixed context (``--ctx N``, or the default) is kept; ``--ctx auto`` takes the longest context,
  up to the trained length, that keeps the offload the default context gets;
- ``--kv-type auto`` walks the ladder f16 -> f16/q8_0 -> q8_0 -> q8_0/q4_0 -> q4_0 (V before K,
  since attention is more sensitive to K) and stops at the first type that offloads the most layers;
- ``--gpu-layers auto`` offloads as many layers as the GPU's free memory allows after the safety
  margin, with their KV cache; the rest and the token embeddings stay in RAM. Layers count as
  llama.cpp counts them: the output layer goes first, then the repeating layers from the last;
- when layers are offloaded, only K/V pairs the GPU runs flash attention for itself are chosen (a
  pair it lacks would run on the CPU, several times slower), and an asked-for pair it lacks is refused.
A plan that cannot fit says why and names the nearest plan that does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from edgellm.gguf.header import GGUFHeader, format_params, human_bytes
from edgellm.options import DEFAULT_CTX, LoadOptions, default_context, is_quantized_kv, uses_flash_attn
from edgellm.plan.memory import CTX_PAD, MemoryEstimate, ModelShape, engine_outputs, estimate, pad
from edgellm.system.hardware import Hardware

MARGIN = 256 << 20  # kept free on each device: drivers, fragmentation, the rest of the system
KV_LADDER = (("f16", "f16"), ("f16", "q8_0"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("q4_0", "q4_0"))


@dataclass(frozen=True)
class Plan:
    n_ctx: int
    type_k: str
    type_v: str
    flash_attn: bool
    n_gpu_layers: int
    memory: MemoryEstimate
    fits: bool
    ram_budget: int
    gpu_budget: int
    reason: str = ""
    op_offload: bool = True  # llama.cpp computes batches of host layers on the GPU (off: no GPU compute buffer)
    parameters: int = 0
    active_parameters: int = 0  # per token: a mixture of experts runs only the routed experts

    def summary(self) -> str:
        where = "CPU only" if self.n_gpu_layers == 0 else f"{self.n_gpu_layers} layers on GPU"
        return (
            f"ctx {self.n_ctx} · kv {self.type_k}/{self.type_v} · {where} · "
            f"RAM {_mib(self.memory.cpu)} · VRAM {_mib(self.memory.gpu)}{self.experts_note()}"
        )

    def verdict(self) -> str:
        """``yes 812.0 MiB+1.2 GiB``: whether it fits, and what it needs in the memory it goes to
        (RAM, then VRAM when layers are offloaded): the library's and the Hub listing's FITS column."""
        need = self.memory
        return f"{'yes' if self.fits else 'no'} {human_bytes(need.cpu)}" + (f"+{human_bytes(need.gpu)}" if need.gpu else "")

    def experts_note(self) -> str:
        """`` · 3.3B of 30.5B parameters active per token`` for a mixture of experts, else ``""``."""
        if not self.active_parameters or self.active_parameters >= self.parameters:
            return ""
        return f" · {format_params(self.active_parameters)} of {format_params(self.parameters)} parameters active per token"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _budgets(hw: Hardware) -> tuple[int, int]:
    gpu = max(hw.gpu_free - MARGIN, 0) if hw.gpus and hw.gpu_offload else 0
    return max(hw.ram_available - MARGIN, 0), gpu


def _probed(hw: Hardware) -> list[str]:
    """The ggml names of the GPUs seen on this machine (not one stated by --gpu-memory alone)."""
    return [g.device for g in hw.gpus if not g.assumed and g.device]


def flash_attn_pairs(hw: Hardware, shape: ModelShape) -> frozenset[tuple[str, str]] | None:
    """The K/V pairs every probed GPU runs flash attention for at this model's head sizes, or None
    when no GPU was probed (none, or one stated by --gpu-memory): then any pair may be planned."""
    probed = _probed(hw)
    if not probed:
        return None
    from edgellm.system.devices import flash_attn_pairs as device_pairs

    n_head, n_head_kv = max(shape.n_head, default=1), max(max(shape.n_head_kv, default=1), 1)
    return frozenset.intersection(*(device_pairs(d, shape.head_dim_k, shape.head_dim_v, n_head, n_head_kv)
                                    for d in probed))


def output_offload(hw: Hardware, shape: ModelShape, n_ubatch: int) -> bool:
    """Whether every probed GPU accepts the output matmul (Vulkan refuses weights larger than its
    storage-buffer range: then llama.cpp keeps the head and the logits in host memory)."""
    probed = _probed(hw)
    if not probed or not shape.output_weight[1]:  # no rows: the head is not known (a checkpoint's shape)
        return True
    from edgellm.system.devices import supports_mul_mat

    return all(supports_mul_mat(d, *shape.output_weight, n_ubatch) for d in probed)


def unsupported_pair(hw: Hardware, shape: ModelShape, type_k: str, type_v: str, flash_attn: str) -> str | None:
    """Why this K/V pair must not be used with layers on the GPU(s), or None when it may."""
    allowed = flash_attn_pairs(hw, shape)
    if allowed is None or _on_device(allowed, type_k, type_v, flash_attn):
        return None
    where = ", ".join(_probed(hw))
    have = " ".join(f"{k}/{v}" for k, v in sorted(allowed)) or "none"
    return (f"this llama.cpp build has no flash-attention kernel for a {type_k}/{type_v} KV cache on {where}, "
            f"so it would run on the CPU, several times slower; pairs it has: {have} (a CUDA build from "
            f"`make chat GPU=cuda` has them all)")


def _on_device(allowed: frozenset[tuple[str, str]], type_k: str, type_v: str, flash_attn: str) -> bool:
    """Whether attention over this K/V pair runs on the GPU: with its flash-attention kernel, or
    without flash attention, which an f16 V cache can do (``auto`` then turns it off)."""
    return (type_k, type_v) in allowed or (flash_attn != "on" and not is_quantized_kv(type_v))


def flash_attn_for(allowed: frozenset[tuple[str, str]] | None, type_k: str, type_v: str, flash_attn: str) -> bool:
    """Whether llama.cpp is asked for flash attention: ``auto`` turns it on where the GPU runs it for
    this pair (``allowed``, None for anywhere), and a quantized V cache needs it."""
    if flash_attn == "auto" and allowed is not None and (type_k, type_v) not in allowed and not is_quantized_kv(type_v):
        return False
    return uses_flash_attn(flash_attn, type_v)


def _best_layers(shape: ModelShape, n_ctx: int, k: str, v: str, fa: bool, ram: int, gpu: int, **kw) -> MemoryEstimate | None:
    """The estimate with the most layers on the GPU that fits both budgets, or None."""
    for ngl in range(shape.n_layer + 1 if gpu else 0, -1, -1):
        est = _fixed_layers(shape, n_ctx, k, v, fa, ram, gpu, ngl, **kw)
        if est is not None:
            return est
    return None


def _fixed_layers(shape: ModelShape, n_ctx: int, k: str, v: str, fa: bool, ram: int, gpu: int, ngl: int, **kw):
    """The estimate at ``ngl`` layers if it fits; with no layer offloaded, a GPU too small for the
    compute buffer llama.cpp would reserve on it is left out of the computation (op_offload off)."""
    for op_offload in (True, False) if ngl == 0 and kw.get("has_gpu") else (True,):
        est = estimate(shape, n_ctx, k, v, fa, ngl, op_offload=op_offload, **kw)
        if est.gpu <= gpu and est.cpu <= ram:
            return est
    return None


def fit(
    header: GGUFHeader | ModelShape,
    hw: Hardware,
    n_ctx: int | None = None,
    type_k: str = "f16",
    type_v: str = "f16",
    n_gpu_layers: int | None = None,
    flash_attn: str = "auto",
    n_ubatch: int = 512,
    n_seq: int = 1,
    swa_full: bool = True,
    n_outputs: int | None = None,
) -> Plan:
    """``None``/``"auto"`` values are chosen; the rest are kept (and checked). ``header`` may be a
    ModelShape already read from it (or a header planned, not read: convert.core.planned_header).
    ``n_outputs``: the most logits rows a batch reads (None: the engine's without a draft, one a
    sequence; 0: every token, as an importance matrix reads them)."""
    shape = header if isinstance(header, ModelShape) else ModelShape.from_header(header)
    n_outputs = engine_outputs(n_seq) if n_outputs is None else n_outputs
    plan = _fit(shape, hw, n_ctx, type_k, type_v, n_gpu_layers, flash_attn, n_ubatch, n_seq, swa_full, n_outputs)
    return replace(plan, parameters=shape.n_params, active_parameters=shape.n_params_active)


def fit_load(header: GGUFHeader | ModelShape, hw: Hardware, load: LoadOptions | None = None) -> Plan:
    """The plan for the settings a model would load with (the defaults for None)."""
    load = load or LoadOptions()
    return fit(header, hw, n_ctx=load.n_ctx, type_k=load.type_k, type_v=load.type_v, n_gpu_layers=load.n_gpu_layers,
               flash_attn=load.flash_attn, n_outputs=engine_outputs(1, load.draft_max if load.draft else 0))


def _fit(shape: ModelShape, hw: Hardware, n_ctx: int | None, type_k: str, type_v: str, n_gpu_layers: int | None,
         flash_attn: str, n_ubatch: int, n_seq: int, swa_full: bool, n_outputs: int) -> Plan:
    ram, gpu = _budgets(hw)
    trained = shape.n_ctx_train or DEFAULT_CTX
    ladder = KV_LADDER if "auto" in (type_k, type_v) else ((type_k, type_v),)
    kw = dict(n_ubatch=n_ubatch, n_seq=n_seq, swa_full=swa_full, has_gpu=bool(hw.gpus and hw.gpu_offload),
              output_offload=output_offload(hw, shape, n_ubatch), n_outputs=n_outputs)
    allowed = flash_attn_pairs(hw, shape) if gpu and n_gpu_layers != 0 else None
    if allowed is not None:
        usable = tuple(pair for pair in ladder if _on_device(allowed, *pair, flash_attn))
        if not usable:
            k, v = ladder[0]
            est = estimate(shape, n_ctx or default_context(trained), k, v, True, 0, **kw)
            return Plan(est.n_ctx, k, v, True, 0, est, False, ram, gpu, unsupported_pair(hw, shape, k, v, flash_attn))
        ladder = usable

    def fa_for(k: str, v: str) -> bool:
        return flash_attn_for(allowed, k, v, flash_attn)

    def attempt(ctx: int, k: str, v: str) -> MemoryEstimate | None:
        fa = fa_for(k, v)
        if n_gpu_layers is None or not gpu:  # without a GPU, asked-for layers stay on the CPU anyway
            return _best_layers(shape, ctx, k, v, fa, ram, gpu, **kw)
        return _fixed_layers(shape, ctx, k, v, fa, ram, gpu, n_gpu_layers, **kw)

    def best_kv(ctx: int) -> tuple[str, str, MemoryEstimate] | None:
        found = []
        for k, v in ladder:
            est = attempt(ctx, k, v)
            if est is not None:
                found.append((k, v, est))
                if est.n_gpu_layers >= shape.n_layer + 1 or not gpu:
                    break  # nothing better to gain by compressing the cache further
        return max(found, key=lambda x: x[2].n_gpu_layers) if found else None

    def plan(choice: tuple[str, str, MemoryEstimate]) -> Plan:
        k, v, est = choice
        return Plan(est.n_ctx, k, v, fa_for(k, v), est.n_gpu_layers, est, True, ram, gpu, op_offload=est.op_offload)

    if n_ctx == 0:  # auto: grow the context while the default context's offload holds
        base_ctx = default_context(trained)
        base = best_kv(base_ctx)
        if base is not None:
            lo, hi = base_ctx, trained
            best = (base_ctx, base)
            while lo < hi:  # binary search over multiples of the KV padding
                mid = pad((lo + hi + 1) // 2, CTX_PAD)
                mid = min(mid, hi)
                choice = best_kv(mid)
                if choice is not None and choice[2].n_gpu_layers >= base[2].n_gpu_layers:
                    best, lo = (mid, choice), mid
                    if mid == hi:
                        break
                else:
                    hi = mid - CTX_PAD
            return plan(best[1])
        n_ctx = base_ctx
    ctx = n_ctx if n_ctx is not None else default_context(trained)
    choice = best_kv(ctx)
    if choice is not None:
        return plan(choice)
    return _does_not_fit(shape, ctx, ladder[-1], flash_attn, ram, gpu, kw, n_gpu_layers)


def _does_not_fit(shape, ctx, kv, flash_attn, ram, gpu, kw, n_gpu_layers) -> Plan:
    """Say what is missing, and find the nearest plan that fits: the same context with a smaller
    cache first, then ever smaller contexts."""
    ngl = 0 if n_gpu_layers is None or not gpu else n_gpu_layers
    fa = uses_flash_attn(flash_attn, kv[1])
    wanted = estimate(shape, ctx, kv[0], kv[1], fa, ngl, **kw)
    nearest = "; even the smallest context does not fit: free memory or use a smaller quantization"
    smaller = pad(ctx)
    while smaller >= CTX_PAD and nearest.startswith("; even"):
        for k, v in KV_LADDER:
            if _best_layers(shape, smaller, k, v, True, ram, gpu, **kw) is not None:
                nearest = f"; nearest plan that fits: --ctx {smaller} --kv-type {k},{v}"
                break
        smaller = pad(smaller // 2) if smaller > CTX_PAD else 0
    reason = (
        f"does not fit: needs {_mib(wanted.cpu)} of RAM and {_mib(wanted.gpu)} of VRAM at context {wanted.n_ctx} "
        f"with KV cache {kv[0]}/{kv[1]}, but only {_mib(ram)} of RAM and {_mib(gpu)} of VRAM are free "
        f"(after a {_mib(MARGIN)} margin each){nearest}"
    )
    return Plan(wanted.n_ctx, kv[0], kv[1], fa, wanted.n_gpu_layers, wanted, False, ram, gpu, reason)


def layer_split(n_layer: int, n_gpu_layers: int, devices: list[tuple[str, int]],
                tensor_split: tuple[float, ...] = ()) -> list[tuple[str, int]]:
    """Where llama.cpp puts each of the ``n_layer`` repeating layers and the output layer:
    ``[("CPU", n), (device, n), ...]``, computed as llama_model's load_tensors does it.

    The offloaded layers are the last ones; they are shared among ``devices`` ((name, free bytes),
    in llama.cpp's order) by ``tensor_split`` or else by free memory, with float32 split points.
    """
    import numpy as np

    counts = {"CPU": 0, **{name: 0 for name, _ in devices}}
    shares = [float(x) for x in tensor_split] if any(tensor_split) else [float(free) for _, free in devices]
    points = np.cumsum(np.asarray(shares, dtype=np.float32), dtype=np.float32)
    points = points / points[-1] if len(points) else points
    n_gpu = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - n_gpu, 0)
    active = min(n_gpu, n_layer + 1) if devices else 0
    for il in range(n_layer + 1):
        if il < start or il - start >= active:
            counts["CPU"] += 1
            continue
        where = int(np.searchsorted(points, np.float32(il - start) / np.float32(active), side="right"))
        counts[devices[min(where, len(devices) - 1)][0]] += 1
    return list(counts.items())


def draft_estimate(draft: GGUFHeader, hw: Hardware, n_ctx: int, n_seq: int = 1) -> MemoryEstimate:
    """A draft model's memory for speculative decoding: every layer on the GPU when there is one
    (it runs for every token, so it must be fast), an f16 cache as long as the model's."""
    shape = ModelShape.from_header(draft)
    on_gpu = bool(hw.gpus and hw.gpu_offload)
    return estimate(shape, n_ctx, "f16", "f16", True, -1 if on_gpu else 0, n_seq=n_seq, has_gpu=on_gpu,
                    n_outputs=engine_outputs(n_seq))


def fit_with_draft(header: GGUFHeader | ModelShape, draft: GGUFHeader | None, hw: Hardware, n_ctx: int | None = None,
                   n_seq: int = 1, draft_max: int = 0, **options) -> tuple[Plan, MemoryEstimate | None]:
    """``fit()`` for a model that decodes with a draft model beside it: the model is planned in what
    the draft leaves. The draft's cache is as long as the model's, so an automatic context is
    planned twice: the draft sized for the default length first, then for the length that found.
    The model's batches read ``draft_max`` more logits rows a sequence with a draft."""
    if draft is None:
        return fit(header, hw, n_ctx=n_ctx, n_seq=n_seq, **options), None
    options["n_outputs"] = engine_outputs(n_seq, draft_max)
    shape = header if isinstance(header, ModelShape) else ModelShape.from_header(header)
    guess = n_ctx or default_context(shape.n_ctx_train)
    for _ in range(2):
        taken = draft_estimate(draft, hw, guess, n_seq)
        plan = fit(shape, leave_room(hw, taken), n_ctx=n_ctx, n_seq=n_seq, **options)
        if n_ctx or not plan.fits or plan.n_ctx <= guess:
            break
        guess = plan.n_ctx
    return plan, taken


def leave_room(hw: Hardware, taken: MemoryEstimate) -> Hardware:
    """The machine as a model is planned on once ``taken`` (its draft model) is loaded: that much
    less RAM, and less free memory on the GPU with the most of it."""
    gpus = list(hw.gpus)
    if gpus and taken.gpu:
        i = max(range(len(gpus)), key=lambda k: gpus[k].free)
        gpus[i] = replace(gpus[i], free=max(gpus[i].free - taken.gpu, 0))
    return replace(hw, ram_available=max(hw.ram_available - taken.cpu, 0), gpus=tuple(gpus))
