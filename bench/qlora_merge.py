"""Where a QLoRA adapter should be merged: into the 16-bit base, or into the 4-bit weights it was
trained against (dequantized)?

SmolLM2-135M-Instruct (the tests' checkpoint) is quantized to NF4 by bitsandbytes, as Unsloth's
``*-bnb-4bit`` bases are. A real QLoRA adapter is trained on that base with ``edgellm finetune
--qlora`` (tests/data/veltrana.jsonl). Two references run in transformers + PEFT: the adapter on
the 4-bit base as trained (unmerged), and PEFT's own ``merge_and_unload`` of it (which
requantizes the merged weights to NF4). Two candidates are converted by edgellm to F16 GGUFs with
the adapter merged and run by llama.cpp: A, merged into the 16-bit base; B, merged into the
dequantized NF4 weights. Over a text (edgellm's calibration text and the training questions),
the script prints the mean KL divergence (reference || candidate) per token and the share of
positions where the top token agrees.

usage: python bench/qlora_merge.py [--steps 40] [--tokens 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "tests" / "data" / "veltrana.jsonl"


def text_ids(folder: Path, n: int) -> list[int]:
    from transformers import AutoTokenizer

    from edgellm.data import __path__ as data_path

    lines = [json.loads(line) for line in DATA.read_text().splitlines()]
    qa = "\n".join(m["content"] for r in lines for m in r["messages"])
    text = qa + "\n" + (Path(data_path[0]) / "calibration.txt").read_text(encoding="utf-8")
    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"][:n]


def peft_logits(base: Path, adapter: Path, ids: list[int], merged: bool) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu")
    model = PeftModel.from_pretrained(model, adapter)
    if merged:
        model = model.merge_and_unload()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    from edgellm.runtime.native import NativeModel

    with NativeModel(path) as model, model.context(n_ctx=len(ids) + 16, n_threads=2) as ctx:
        return ctx.logits([ids], first=0)[0]


def compare(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(mean KL(ref || cand) in nats per token, top-1 agreement)."""

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == cand.argmax(-1)).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=512)
    args = ap.parse_args()

    from edgellm.convert import convert
    from edgellm.models.bundled import bundled_gguf
    from tests.hf_fixtures import hf_checkpoint
    from tests.quant_fixtures import bnb_checkpoint

    work = Path(tempfile.mkdtemp(prefix="edgellm-qlora-merge-"))
    base16 = hf_checkpoint(bundled_gguf(), "smollm2-135m-instruct")
    nf4 = bnb_checkpoint(base16, work / "nf4", "nf4")
    home = work / "home"
    subprocess.run([sys.executable, "-m", "edgellm", "finetune", str(nf4), str(DATA),
                    "--qlora", "--steps", str(args.steps), "--name", "veltrana"], check=True,
                   env=dict(os.environ, EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT)))
    adapter = next(home.rglob("adapter_config.json")).parent
    ids = text_ids(base16, args.tokens)

    references = {"PEFT, unmerged on the 4-bit base": peft_logits(nf4, adapter, ids, merged=False),
                  "PEFT merge_and_unload (4-bit)": peft_logits(nf4, adapter, ids, merged=True)}
    candidates = {}
    for label, source in (("A: into the 16-bit base", base16), ("B: into the dequantized NF4", nf4)):
        out = work / f"{source.name}-merged.gguf"
        convert(source, out, "f16", lora=[adapter])
        candidates[label] = gguf_logits(out, ids)
    print(f"SmolLM2-135M-Instruct, NF4 by bitsandbytes, QLoRA r=16 for {args.steps} steps; {len(ids)} tokens")
    for ref_label, ref in references.items():
        print(f"against {ref_label}:")
        for label, cand in candidates.items():
            kl, top1 = compare(ref, cand)
            print(f"  {label:32} KL {kl:.5f} nats/token   top-1 agreement {top1:.3f}")
    kl, top1 = compare(*references.values())
    print(f"(PEFT merged against PEFT unmerged: KL {kl:.5f}, top-1 {top1:.3f})")


if __name__ == "__main__":
    main()
