"""The one way a model is opened to answer: chat, run, the app and the server's pool load here.

``resolve_load`` decides every automatic choice and makes every refusal that can be made before
llama.cpp sees the file (a context longer than the model was trained on, a quantized V cache
without flash attention, a K/V pair the GPU has no kernel for, a plan that does not fit), because
llama.cpp itself only says "Failed to create llama_context". ``load_model`` then opens the model
(its RPC workers checked and its layers placed on them, a LoRA checked against it), its draft and
the engine: one sequence stepped in the caller's thread for chat, run and the app; ``n_seq``
sequences on the engine's own thread for a server.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgellm.errors import LoadError, UsageError
from edgellm.gguf.header import GGUFHeader, check_lora, read_header
from edgellm.options import LoadOptions, default_context, is_quantized_kv, uses_flash_attn
from edgellm.runtime.batch import BatchEngine
from edgellm.runtime.engine import Model, ResolvedLoad
from edgellm.runtime.native import NativeModel
from edgellm.runtime.speculative import load_drafter
from edgellm.runtime.templates import ChatTemplate
from edgellm.system import llamalog
from edgellm.system.hardware import physical_cores

if TYPE_CHECKING:
    from edgellm.system.hardware import Hardware


def resolve_load(header: GGUFHeader, options: LoadOptions, hardware: Hardware | None = None, n_seq: int = 1,
                 plan: bool = False) -> ResolvedLoad:
    """Decide the automatic choices and refuse impossible ones before llama.cpp is involved.
    ``options.n_ctx`` is each of ``n_seq`` sequences' context; ``plan`` plans memory even when
    nothing is automatic (a server keeps several models and must know what each takes)."""
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
    type_k, type_v, n_gpu_layers, planned = options.type_k, options.type_v, options.n_gpu_layers, None
    n_batch = min(options.n_batch, n_ctx * n_seq) if n_ctx else options.n_batch
    draft = read_header(options.draft) if options.draft else None
    taken = None  # the draft model's memory
    if plan or n_ctx == 0 or n_gpu_layers is None or "auto" in (type_k, type_v) or draft is not None:
        from edgellm.plan.fit import fit_with_draft
        from edgellm.system.hardware import probe

        planned, taken = fit_with_draft(
            header, draft, hardware or probe(), n_ctx=n_ctx * n_seq, type_k=type_k, type_v=type_v,
            n_gpu_layers=n_gpu_layers, flash_attn=options.flash_attn, n_ubatch=n_batch, n_seq=n_seq,
            draft_max=options.draft_max,
        )
        if not planned.fits:
            beside = f" beside draft {draft.path.name}" if draft else ""
            raise LoadError(f"{header.path.name} {planned.reason}{beside}")
        n_ctx = n_ctx or planned.n_ctx // n_seq
        type_k, type_v, n_gpu_layers = planned.type_k, planned.type_v, planned.n_gpu_layers
        flash_attn = planned.flash_attn
    else:
        n_gpu_layers, flash_attn = _on_device(header, options, hardware)
    return ResolvedLoad(
        n_ctx=n_ctx,
        n_batch=min(options.n_batch, n_ctx * n_seq),
        n_threads=options.n_threads or physical_cores(),
        n_gpu_layers=n_gpu_layers,
        flash_attn=flash_attn,
        type_k=type_k,
        type_v=type_v,
        op_offload=planned.op_offload if planned else True,
        n_seq=n_seq,
        plan=planned,
        draft=draft.path if draft else None,
        draft_max=options.draft_max,
        draft_p_min=options.draft_p_min,
        draft_gpu_layers=taken.n_gpu_layers if taken else 0,
        draft_ram=taken.cpu if taken else 0,
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
    named = [(f"{g.device}@{g.name}" if g.backend.startswith("RPC") else g.device or g.name, g.free)
             for g in gpus]
    return tuple(layer_split(n_layer, n_gpu_layers, named, tensor_split))


def load_model(
    path: str | Path,
    options: LoadOptions | None = None,
    template: str | ChatTemplate | None = None,
    header: GGUFHeader | None = None,
    hardware: Hardware | None = None,
    n_seq: int = 1,
    threaded: bool = False,
    max_queue: int = 64,
    load: ResolvedLoad | None = None,
) -> Model:
    """Validate, plan, then load a GGUF. ``template`` overrides the file's own chat template;
    ``hardware`` is what the planner plans for (default: probe this machine). ``n_seq`` > 1 or
    ``threaded``: a server's engine, planned in full, answering on its own thread. ``load``: what
    ``resolve_load`` already decided for these options (a server plans before making room)."""
    options = options or LoadOptions()
    header = header or read_header(path)
    if options.rpc:
        from edgellm.system.hardware import probe
        from edgellm.system.rpc import check_alive

        check_alive(options.rpc)  # llama.cpp aborts on a worker that died since it was last asked
        hardware = hardware or probe(rpc=options.rpc)
    load = load or resolve_load(header, options, hardware, n_seq, plan=threaded)
    if options.rpc:
        load = replace(load, split=rpc_split(header, load.n_gpu_layers, hardware, options.tensor_split))
    lora = check_lora(options.lora, header)
    chat_template = template if isinstance(template, ChatTemplate) else _template_for(header, template)
    position = llamalog.mark()
    native = NativeModel(header.path, load.n_gpu_layers, lora, options.lora_scale, options.tensor_split)
    drafter = None
    try:
        if load.draft:
            drafter = load_drafter(load.draft, native, n_seq, load.n_ctx, load.n_batch, load.n_threads,
                                   load.draft_max, load.draft_p_min, load.draft_gpu_layers)
        engine = BatchEngine(native, n_seq, load.context(), max_queue=max_queue, threaded=threaded,
                             drafter=drafter)
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
