"""The base model a run trains an adapter on: loaded 16-bit (fp32 on a CPU), or 4-bit NF4 for
QLoRA tensor by tensor, with a PEFT LoRA on the chosen linear layers.

transformers' own 4-bit path loads every 16-bit weight before quantizing, so its peak is the
16-bit model's; here the model is built empty and each linear weight is read, quantized and
dropped in turn, so QLoRA's peak is the 4-bit model plus one tensor, as the planner promises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgellm.errors import CheckpointError, MissingDependencyError

#: what ``--targets all-linear`` means: every linear layer but the output head (PEFT's rule)
ALL_LINEAR = "all-linear"


def require_training() -> None:
    """torch and PEFT are an extra: say how to get them rather than fail on an import. The
    libraries' own chatter (progress bars, bitsandbytes' note that it could not fetch a kernel
    from the Hub) is silenced: a run reports its own progress."""
    import importlib.util
    import logging

    missing = [m for m in ("torch", "peft") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"fine-tuning needs {' and '.join(missing)}", hint="pip install 'edgellm[train]'"
        )
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def device() -> str:
    """Where this process trains: its own GPU when accelerate's launcher started several."""
    import os

    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{os.environ['LOCAL_RANK']}" if "LOCAL_RANK" in os.environ else "cuda"


def world_size() -> int:
    """How many processes train together (``finetune --devices N``: accelerate's launcher says)."""
    import os

    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def first_process() -> bool:
    """Whether this process is the one that reports and writes (the only one, or rank 0 of several)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16, AMX, Arm's BF16): there a bf16
    base trains faster than fp32 and in less memory; elsewhere bf16 is emulated and slower."""
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="replace").read()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def compute_dtype(dev: str, requested: str | None = None) -> str:
    """The base's dtype for a run: what was asked, else bf16 where the device is fast at it."""
    if requested in ("bf16", "fp32"):
        return requested
    return "bf16" if dev != "cpu" or cpu_has_bf16() else "fp32"


def _torch_dtype(name: str) -> Any:
    import torch

    return torch.bfloat16 if name == "bf16" else torch.float32


def prequantized(config: dict) -> bool:
    """Whether a checkpoint ships bitsandbytes 4-bit weights (``*-bnb-4bit`` repos): QLoRA then
    trains on them as they are. Other pre-quantized kinds are refused here (#35 converts them)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return False
    if quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit"):
        return True
    raise CheckpointError(f"cannot train on a {quant.get('quant_method', '?')} "
                          f"{'8-bit ' if quant.get('load_in_8bit') else ''}quantized checkpoint",
                          hint="fine-tune its 16-bit checkpoint (with --qlora for 4-bit training)")


def load_base(folder: Path, *, qlora: bool, dev: str, dtype: str = "fp32", double_quant: bool = True,
              four_bit: bool = False) -> Any:
    """The base model, frozen, on ``dev``, its unquantized weights in ``dtype`` (bf16 or fp32);
    ``four_bit``: the checkpoint's own bitsandbytes 4-bit weights, loaded as they are."""
    from transformers import AutoModelForCausalLM

    try:
        if qlora and not four_bit:
            model = _load_4bit(Path(folder), dev, _torch_dtype(dtype), double_quant)
        else:  # transformers loads 16-bit weights, and a bnb checkpoint's 4-bit ones as they are
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=_torch_dtype(dtype), device_map=dev)
    except (CheckpointError, MissingDependencyError):
        raise
    except Exception as exc:  # transformers raises many kinds for a model it cannot build
        raise CheckpointError(f"cannot load {folder} for training: {type(exc).__name__}: {exc}") from None
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _load_4bit(folder: Path, dev: str, dtype: Any, double_quant: bool) -> Any:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise MissingDependencyError(
            "QLoRA needs bitsandbytes", hint="pip install 'edgellm[train]'"
        ) from None
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.convert.checkpoint import weight_files

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():  # parameters on "meta", buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(
                model.get_submodule(parent) if parent else model,
                child,
                bnb.nn.Linear4bit(
                    module.in_features,
                    module.out_features,
                    bias=module.bias is not None,
                    compute_dtype=dtype,
                    compress_statistics=double_quant,
                    quant_type="nf4",
                    device="meta",
                ),
            )
    modules = dict(model.named_modules())
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                owner, _, leaf = key.rpartition(".")
                module = modules.get(owner)
                if module is None or leaf not in dict(module.named_parameters(recurse=False)):
                    continue
                tensor = f.get_tensor(key)
                if isinstance(module, bnb.nn.Linear4bit) and leaf == "weight":
                    module.weight = bnb.nn.Params4bit(
                        tensor.to(dtype),
                        requires_grad=False,
                        quant_type="nf4",
                        compress_statistics=double_quant,
                        module=module,
                    ).to(dev)
                else:
                    set_module_tensor_to_device(model, key, dev, value=tensor.to(dtype))
                del tensor
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    empty = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if empty:
        raise CheckpointError(f"{folder} lacks {len(empty)} of the model's weights (e.g. {empty[0]})")
    return model


def adapt(
    model: Any,
    *,
    rank: int,
    alpha: float,
    targets: str | list[str],
    dropout: float = 0.0,
    gradient_checkpointing: bool = False,
) -> Any:
    """The model with a fresh LoRA on ``targets`` (module names, or all-linear)."""
    from peft import LoraConfig, get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=targets if targets == ALL_LINEAR else list(targets),
    )
    try:
        peft = get_peft_model(model, config)
    except ValueError as exc:  # PEFT's word for targets that match nothing, or a layer type it cannot wrap
        raise CheckpointError(
            f"PEFT cannot put a LoRA on this model's {targets}: {exc}",
            hint="name the linear layers with --targets (e.g. q_proj,v_proj)",
        ) from None
    for p in peft.parameters():  # the adapter trains in fp32 even on a 16-bit base
        if p.requires_grad:
            p.data = p.data.float()
    return peft
