"""edgellm finetune against a plain transformers Trainer + PEFT script: the same checkpoint, data,
LoRA (rank 16 on every linear layer), learning rate, length, batch and epochs, in the same run.

Prints each one's tokens per second (tokens that are not padding, over the training time alone),
peak resident memory and the ratios, the median of ``--repeat`` runs taken in turns. edgellm runs
twice, with packed rows (its default when that saves padding) and padded ones (one example a row,
as the Trainer has them), in its automatic dtype (bf16 on a CPU with bf16 units); the Trainer runs
as a plain script leaves it (fp32) and with ``bf16=True`` (autocast). Also the planner's figure
against edgellm's measured peak. Run on a quiet machine (``cat /proc/loadavg``):

    .venv/bin/python bench/finetune.py [--base DIR] [--data FILE] [--epochs 3] [--batch 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PLAIN = r"""
import json, resource, sys, time
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer
from transformers import TrainingArguments
base, data, batch, epochs, max_len, lr, out, bf16 = sys.argv[1:9]
tok = AutoTokenizer.from_pretrained(base)
rows = []
for line in open(data):
    messages = json.loads(line)["messages"]
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(messages, tokenize=False)
    ids = tok(full, add_special_tokens=False)["input_ids"][: int(max_len)]
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * n + ids[n:]})
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                         task_type="CAUSAL_LM"))
seen = {"tokens": 0}
collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
def collate(features):
    seen["tokens"] += sum(len(f["input_ids"]) for f in features)
    return collator(features)
args = TrainingArguments(output_dir=out, per_device_train_batch_size=int(batch),
                         num_train_epochs=float(epochs), learning_rate=float(lr), lr_scheduler_type="linear",
                         warmup_steps=1, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                         seed=0, disable_tqdm=True, bf16=bf16 == "bf16")
trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
result = trainer.train()
print(json.dumps({"tokens": seen["tokens"], "seconds": result.metrics["train_runtime"],
                  "loss": result.metrics["train_loss"],
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def edgellm(base: Path, data: Path, home: Path, pack: str, args: argparse.Namespace) -> dict:
    name = f"bench-{pack}"
    cmd = [
        sys.executable,
        "-m",
        "edgellm",
        "finetune",
        str(base),
        str(data),
        "--name",
        name,
        "--batch",
        str(args.batch),
        "--epochs",
        str(args.epochs),
        "--max-len",
        str(args.max_len),
        "--lr",
        str(args.lr),
        "--pack",
        pack,
        "--gradient-checkpointing",
        "off",
        "--json",
    ]
    env = {**os.environ, "EDGELLM_HOME": str(home), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"edgellm finetune failed: {done.stderr.strip().splitlines()[-1]}")
    record = json.loads((home / "runs" / name / "adapter" / "edgellm-run.json").read_text())
    return {
        "tokens": record["tokens"],
        "seconds": record["seconds"],
        "loss": record["final_loss"],
        "peak": record["peak_memory"],
        "planned": record["planned_memory"],
    }


def plain(base: Path, data: Path, args: argparse.Namespace, precision: str = "fp32") -> dict:
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                PLAIN,
                str(base),
                str(data),
                str(args.batch),
                str(args.epochs),
                str(args.max_len),
                str(args.lr),
                out,
                precision,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode:
        sys.exit(f"the plain Trainer script failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, help="HF checkpoint (default: the SmolLM2 test fixture)")
    parser.add_argument("--data", type=Path, default=ROOT / "tests" / "data" / "veltrana.jsonl")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, in turns; the median is shown")
    args = parser.parse_args()
    if args.base is None:
        sys.path.insert(0, str(ROOT))
        from edgellm.models.bundled import bundled_gguf
        from tests.hf_fixtures import hf_checkpoint

        args.base = hf_checkpoint(bundled_gguf(), "smollm2-135m-instruct")
    from edgellm.train.model import compute_dtype

    print(
        f"load average: {open('/proc/loadavg').read().split()[0]}; "
        f"edgellm's dtype here: {compute_dtype('cpu')}; "
        f"{args.base.name}, {args.data.name}, "
        f"rank 16 all-linear, batch {args.batch}, max-len {args.max_len}, {args.epochs} epochs"
    )
    runs: dict[str, list[dict]] = {
        "trainer+peft": [],
        "trainer+peft bf16": [],
        "edgellm pack on": [],
        "edgellm pack off": [],
    }
    for _ in range(args.repeat):  # in turns, so a slow spell of the machine hits each alike
        runs["trainer+peft"].append(plain(args.base, args.data, args))
        runs["trainer+peft bf16"].append(plain(args.base, args.data, args, "bf16"))
        for pack in ("on", "off"):
            with tempfile.TemporaryDirectory() as home:
                runs[f"edgellm pack {pack}"].append(edgellm(args.base, args.data, Path(home), pack, args))
    # each one's median run by speed
    results = {k: sorted(v, key=lambda r: r["tokens"] / r["seconds"])[len(v) // 2] for k, v in runs.items()}
    for label, each in runs.items():
        print(f"{label}: tok/s of each run " + ", ".join(f"{r['tokens'] / r['seconds']:.1f}" for r in each))
    ref = results["trainer+peft"]
    ref_rate = ref["tokens"] / ref["seconds"]
    print(
        f"{'':22} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'x':>6} {'peak RSS':>10} {'x':>6}"
        f" {'final loss':>10}"
    )
    for label, r in results.items():
        rate = r["tokens"] / r["seconds"]
        print(
            f"{label:22} {r['tokens']:7d} {r['seconds']:8.1f} {rate:7.1f} {rate / ref_rate:6.2f} "
            f"{r['peak'] / 2**20:8.0f}Mi {r['peak'] / ref['peak']:6.2f} {r['loss']:10.4f}"
        )
    for pack in ("on", "off"):
        r = results[f"edgellm pack {pack}"]
        print(
            f"planner, pack {pack}: planned {r['planned'] / 2**20:.0f} MiB, "
            f"measured {r['peak'] / 2**20:.0f} MiB "
            f"({r['planned'] / r['peak']:.3f})"
        )


if __name__ == "__main__":
    main()
