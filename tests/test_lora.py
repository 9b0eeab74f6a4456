"""LoRA: a real PEFT adapter on the SmolLM2 checkpoint, merged while streaming or applied at load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellm.convert import convert
from edgellm.convert.lora import convert_lora, merge_checkpoint
from edgellm.runtime.native import NativeModel
from tests.conftest import tree
from tests.hf_fixtures import peft_adapter, tiny_llama
from tests.test_convert import PROMPTS, TOLERANCE, gguf_logits, hf_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(smollm2_adapter: Path) -> Path:
    return smollm2_adapter


@pytest.fixture(scope="module")
def peft_merged(smollm2_hf: Path, adapter: Path):
    """transformers + PEFT's own merge_and_unload: the reference every result is held against."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()


@pytest.fixture(scope="module")
def ggufs(smollm2_hf: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lora-gguf")
    return {
        "base": convert(smollm2_hf, out / "base.gguf", "f32").path,
        "merged": convert(smollm2_hf, out / "merged.gguf", "f32", lora=[adapter]).path,
        "lora": convert_lora(adapter, smollm2_hf, out / "lora.gguf", "f32").path,
    }


def test_streamed_merge_equals_peft_merge_and_unload(smollm2_hf: Path, adapter: Path, peft_merged, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    result = merge_checkpoint(smollm2_hf, [adapter], tmp_path / "merged")
    ours = load_file(str(result.path / "model.safetensors"))
    theirs = {k: v.numpy() for k, v in peft_merged.state_dict().items()}
    assert set(ours) <= set(theirs) and len(ours) == 272
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in ours) < 1e-4
    base = load_file(str(smollm2_hf / "model.safetensors"))
    assert float(np.abs(ours["model.layers.3.self_attn.q_proj.weight"] - base["model.layers.3.self_attn.q_proj.weight"]).max()) > 1e-3
    assert (tmp_path / "merged" / "tokenizer.json").is_file() and (tmp_path / "merged" / "config.json").is_file()


def _peft_logits(model, ids):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0, -1].numpy() for seq in ids]


def test_merged_gguf_answers_like_peft_and_unlike_the_base(smollm2_hf: Path, peft_merged, ggufs) -> None:
    ids = hf_ids(smollm2_hf, PROMPTS)
    merged, base = gguf_logits(ggufs["merged"], ids), gguf_logits(ggufs["base"], ids)
    moved = 0.0
    for prompt, h, m, b in zip(PROMPTS, _peft_logits(peft_merged, ids), merged, base):
        assert int(h.argmax()) == int(m.argmax()), prompt
        assert float(np.abs(h - m).max()) < TOLERANCE
        moved = max(moved, float(np.abs(m - b).max()))
    assert moved > 10 * TOLERANCE  # the adapter really acted


def test_gguf_lora_at_load_time_equals_the_merged_model(smollm2_hf: Path, ggufs) -> None:
    ids = hf_ids(smollm2_hf, PROMPTS)
    merged = gguf_logits(ggufs["merged"], ids)
    with NativeModel(ggufs["base"], lora=ggufs["lora"]) as model, model.context(n_ctx=512, n_threads=2) as ctx:
        for seq, m in zip(ids, merged):
            ctx.clear()
            applied = ctx.logits([seq], first=len(seq) - 1)[0][0]
            assert int(applied.argmax()) == int(m.argmax())
            assert float(np.abs(applied - m).max()) < TOLERANCE


def test_lora_gguf_metadata(ggufs, adapter: Path) -> None:
    from gguf import GGUFReader

    reader = GGUFReader(ggufs["lora"])
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 16.0 and fields["general.architecture"] == "llama"
    names = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert len(names) == 30 * 7 * 2
    assert names["blk.0.attn_q.weight.lora_a"] == (576, 8) and names["blk.0.attn_q.weight.lora_b"] == (8, 576)


def test_cli_chat_run_with_lora(cli, ggufs) -> None:
    plain = cli("run", str(ggufs["base"]), "--temp", "0", "-n", "12", "Write a sentence about cats.")
    adapted = cli("run", str(ggufs["base"]), "--lora", str(ggufs["lora"]), "--temp", "0", "-n", "12",
                  "Write a sentence about cats.")
    off = cli("run", str(ggufs["base"]), "--lora", str(ggufs["lora"]), "--lora-scale", "0", "--temp", "0", "-n", "12",
              "Write a sentence about cats.")
    assert plain.returncode == adapted.returncode == off.returncode == 0, adapted.stderr
    assert adapted.stdout != plain.stdout and off.stdout == plain.stdout
    wrong = cli("run", str(ggufs["base"]), "--lora", str(ggufs["merged"]), "-n", "2", "hi")
    assert wrong.returncode == 2 and "merged.gguf is not a LoRA adapter GGUF" in wrong.stderr


def _copy(adapter: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


def _edit(adapter: Path, **changes) -> None:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def _edit_weights(adapter: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    edit(weights)
    save_file(weights, str(adapter / "adapter_model.safetensors"))


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _rename(weights: dict, old: str, new: str) -> None:
    weights[new] = weights.pop(old)


ERRORS = {
    "other-arch": (lambda a: _edit(a, auto_mapping={"base_model_class": "Qwen2ForCausalLM"}),
                   "was trained on a Qwen2ForCausalLM, the base is a LlamaForCausalLM"),
    "rank": (lambda a: _edit(a, r=16), "rank mismatch in module model.layers.0.mlp.down_proj: adapter_config.json says r=16"),
    "missing-b": (lambda a: _edit_weights(a, lambda w: w.pop(Q + ".lora_B.weight")),
                  "lacks lora_B for module model.layers.0.self_attn.q_proj"),
    "no-weights": (lambda a: (a / "adapter_model.safetensors").unlink(), "has no adapter_model.safetensors"),
    "base-lacks-module": (lambda a: _edit_weights(a, lambda w: (
        _rename(w, Q + ".lora_A.weight", Q.replace("layers.0", "layers.99") + ".lora_A.weight"),
        _rename(w, Q + ".lora_B.weight", Q.replace("layers.0", "layers.99") + ".lora_B.weight"))),
        "the base model has no module model.layers.99.self_attn.q_proj"),
    "dora": (lambda a: _edit(a, use_dora=True), "is a DoRA adapter, which edgellm does not merge"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_cli_refuses_bad_adapters(cli, smollm2_hf: Path, adapter: Path, tmp_path: Path, case: str) -> None:
    change, message = ERRORS[case]
    broken = _copy(adapter, tmp_path)
    change(broken)
    out = tmp_path / "out"
    for args in (["convert", str(smollm2_hf), "--lora", str(broken), "-o", str(out / "m.gguf")],
                 ["convert-lora", str(broken), "--base", str(smollm2_hf), "-o", str(out / "l.gguf")],
                 ["merge", str(smollm2_hf), str(broken), "-o", str(out / "merged")]):
        done = cli(*args)
        assert done.returncode == 1 and message in done.stderr, (args[0], done.stderr)
        assert done.stderr.count("\n") == 1
    assert tree(out) == {} and tree(cli.home / "models") == {}


def test_adapter_for_another_hidden_size_is_refused(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    tiny = tiny_llama(tmp_path / "tiny", smollm2_hf)
    small = peft_adapter(tiny, tmp_path / "tiny-adapter")
    done = cli("convert", str(smollm2_hf), "--lora", str(small), "-o", str(tmp_path / "x.gguf"))
    assert done.returncode == 1
    assert "does not fit the base: module model.layers.0.mlp.down_proj is [576, 1536] in the base but [64, 128]" in done.stderr
    assert not (tmp_path / "x.gguf").exists()


VARIANTS = {
    # an embedding LoRA (PEFT also saves the base embedding beside it)
    "embedding": dict(target_modules=["embed_tokens", "q_proj"]),
    # rsLoRA (alpha / sqrt(r)) with a rank and an alpha that differ per module
    "rslora-patterns": dict(use_rslora=True, rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 32}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_adapter_variants_merge_like_peft(smollm2_hf: Path, tmp_path: Path, variant: str) -> None:
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    adapter = peft_adapter(smollm2_hf, tmp_path / variant, **VARIANTS[variant])
    ours = load_file(str(merge_checkpoint(smollm2_hf, [adapter], tmp_path / "merged").path / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    assert max(float(np.abs(ours[k] - theirs[k].numpy()).max()) for k in ours) < 1e-4
    if variant == "rslora-patterns":  # one alpha per GGUF LoRA file: the patterns are folded into B
        merged = convert(smollm2_hf, tmp_path / "merged.gguf", "f32", lora=[adapter]).path
        lora = convert_lora(adapter, smollm2_hf, tmp_path / "lora.gguf", "f32").path
        base_gguf = convert(smollm2_hf, tmp_path / "base.gguf", "f32").path
        ids = hf_ids(smollm2_hf, PROMPTS[:2])
        expected = gguf_logits(merged, ids)
        with NativeModel(base_gguf, lora=lora) as model, model.context(n_ctx=512, n_threads=2) as ctx:
            for seq, m in zip(ids, expected):
                ctx.clear()
                assert float(np.abs(ctx.logits([seq], first=len(seq) - 1)[0][0] - m).max()) < TOLERANCE
