"""`edgellm convert --lora` against the usual route: PEFT merge_and_unload + save_pretrained + convert.

Both routes run as child processes on the same base checkpoint and adapter, in one run; time and
peak RSS come from each child's rusage (the PEFT route's peak is the larger of its two steps,
its time their sum). Goals: RSS ratio <= 0.5, time ratio <= 1.0.

Input: the SmolLM2 checkpoint and a PEFT adapter (r=8, seven target modules) made as the tests
make them, unless given.

usage: python bench/compare_lora.py [BASE ADAPTER] [--outtype f16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from compare_convert import ROOT, default_checkpoint, measure

PEFT_MERGE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
AutoTokenizer.from_pretrained(base).save_pretrained(out)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", nargs="?", type=Path)
    ap.add_argument("adapter", nargs="?", type=Path)
    ap.add_argument("--outtype", default="f16")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgellm-lora-bench-"))
    base = args.base or default_checkpoint(False)
    adapter = args.adapter
    if adapter is None:
        from tests.hf_fixtures import peft_adapter

        adapter = peft_adapter(base, work / "adapter")

    ours = measure([sys.executable, "-m", "edgellm", "convert", str(base), "--lora", str(adapter),
                    "-o", str(work / "ours.gguf"), "--outtype", args.outtype])
    merged = measure([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(work / "peft-merged")])
    converted = measure([sys.executable, "-m", "edgellm", "convert", str(work / "peft-merged"),
                         "-o", str(work / "peft.gguf"), "--outtype", args.outtype])
    peft = (merged[0] + converted[0], max(merged[1], converted[1]))
    print(f"base: {base}\nadapter: {adapter}")
    print(f"edgellm convert --lora      {ours[0]:7.2f} s   peak RSS {ours[1] / 2**20:8.1f} MiB")
    print(f"PEFT merge + save + convert {peft[0]:7.2f} s   peak RSS {peft[1] / 2**20:8.1f} MiB"
          f"   (merge+save {merged[0]:.2f} s / {merged[1] / 2**20:.0f} MiB)")
    print(f"ratio: time {ours[0] / peft[0]:.3f}  RSS {ours[1] / peft[1]:.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
