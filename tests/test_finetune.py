"""Fine-tuning: data formats and their loss masks, the training-memory planner, the loop's
packing, checkpoints and resume, bad input, and the whole flow on the real SmolLM2 checkpoint
(a dozen made-up facts learned, exported to GGUF and answered by ``edgellm run``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.gguf.header import read_header
from tests.conftest import ROOT, tree

DATA = Path(__file__).parent / "data"
FACTS, HELD_OUT = DATA / "veltrana.jsonl", DATA / "veltrana-heldout.jsonl"


@pytest.fixture(scope="module")
def tokens(smollm2_hf: Path):
    from edgellm.train.data import Tokens

    return Tokens.for_checkpoint(smollm2_hf)


def write(path: Path, *records, raw: str | None = None) -> Path:
    path.write_text(
        raw if raw is not None else "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8"
    )
    return path


def learned_text(tokens, example) -> str:
    return tokens.tokenizer.decode([i for i, t in zip(example.ids, example.trained, strict=True) if t])


# -- data formats and masks ---------------------------------------------------------------------------
def test_chat_loss_is_on_assistant_turns_only(tokens, tmp_path: Path) -> None:
    from edgellm.train.data import prepare

    data = write(
        tmp_path / "chat.jsonl",
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"},
                {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Good"}, {"type": "text", "text": "bye."}],
                },
            ]
        },
    )
    out = prepare(data, tokens, 512)
    (example,) = out.examples
    assert out.format == "messages"
    assert learned_text(tokens, example) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    full = tokens.tokenizer.decode(example.ids)
    assert full.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert (
        out.trained_tokens == sum(example.trained) and out.masked_tokens == len(example) - out.trained_tokens
    )
    assert "trained" in out.summary() and "masked" in out.summary()


@pytest.mark.parametrize(
    ("record", "fmt", "learned"),
    [
        ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca", "5<|im_end|>\n"),
        ({"prompt": "2+3=", "completion": "5"}, "prompt-completion", "5<|im_end|>"),
        ({"text": "Veltrana is an island."}, "text", "Veltrana is an island.<|im_end|>"),
    ],
    ids=["alpaca", "prompt-completion", "text"],
)
def test_each_format_is_detected_and_masked(
    tokens, tmp_path: Path, record: dict, fmt: str, learned: str
) -> None:
    from edgellm.train.data import prepare

    out = prepare(write(tmp_path / "d.jsonl", record), tokens, 512)
    assert out.format == fmt
    text = learned_text(tokens, out.examples[0])
    # the first token is never a target (nothing predicts it): plain text loses its first word
    assert text.endswith(learned.split(" ", 1)[-1])


def test_tool_calls_in_chat_data_are_rendered_and_learned(tokens, tmp_path: Path) -> None:
    from edgellm.train.data import prepare

    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Orskel"}'},
    }
    data = write(
        tmp_path / "tools.jsonl",
        {
            "tools": [
                {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
            ],
            "messages": [
                {"role": "user", "content": "Weather in Orskel?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."},
            ],
        },
    )
    example = prepare(data, tokens, 1024).examples[0]
    text = learned_text(tokens, example)
    assert "weather" in text and "Orskel" in text and "It is sunny." in text
    assert "sunny<|im_end|>" not in text.replace("It is sunny.", "")  # the tool's answer is not learned


def test_the_same_file_gives_the_same_tokens_when_calls_have_no_id(tmp_path: Path, tokens) -> None:
    """A template that renders call ids (Mistral's do): a call without one gets an id from its place,
    so the file reads the same every time (a resumed run must see the tokens it started with)."""
    from edgellm.runtime.templates import ChatTemplate
    from edgellm.train.data import Tokens, prepare

    source = ("{% for m in messages %}{% for c in m.tool_calls or [] %}[{{ c.id }}]{% endfor %}"
              "{{ m.content }}|{% endfor %}")
    with_ids = Tokens(tokens.tokenizer, ChatTemplate(source, "test"))
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Orskel"}}}
    data = write(tmp_path / "calls.jsonl", {"messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]})
    first, again = prepare(data, with_ids, 256), prepare(data, with_ids, 256)
    assert first.examples == again.examples and first.sha256 == again.sha256
    assert "[call_1_2_0]" in with_ids.tokenizer.decode(first.examples[0].ids)


def test_a_template_that_rewrites_history_gives_one_example_per_turn(tmp_path: Path, tokens) -> None:
    from edgellm.runtime.templates import ChatTemplate
    from edgellm.train.data import Tokens, prepare

    # like Qwen3's: only the last assistant turn keeps its text in full
    source = (
        "{% for m in messages %}<{{ m.role }}>{% if m.role == 'assistant' and not loop.last %}...{% else %}"
        "{{ m.content }}{% endif %}</{{ m.role }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    rewriting = Tokens(tokens.tokenizer, ChatTemplate(source, "test"))
    data = write(
        tmp_path / "two.jsonl",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "first"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "second"},
            ]
        },
    )
    out = prepare(data, rewriting, 512)
    assert [learned_text(rewriting, e) for e in out.examples] == ["first</assistant>", "second</assistant>"]


def test_examples_longer_than_max_len_are_cut_and_counted(tokens, tmp_path: Path) -> None:
    from edgellm.train.data import prepare

    data = write(tmp_path / "long.jsonl", {"text": "word " * 400}, {"text": "short one"})
    out = prepare(data, tokens, 64)
    assert max(len(e) for e in out.examples) == 64
    assert out.cut == 1 and "1 cut to --max-len" in out.summary()


# -- rows: packed examples do not see each other ----------------------------------------------------
def test_packing_fills_rows_and_keeps_examples_apart(smollm2_hf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.train.data import Example, packed_rows, padding_share
    from edgellm.train.loop import collate

    assert packed_rows([60, 50, 40, 30, 20], 100) == [[0, 2], [1, 3, 4]]  # first fit, longest first
    padded, packed = padding_share([10, 100, 12, 90, 8, 95], 2, 128)
    assert packed < padded
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    a = Example((1, 504, 3457, 314, 253, 2102), (False, True, True, True, True, True))
    b = Example((1, 28120, 46, 5248, 2), (False, False, True, True, True))
    ids, positions, targets, real = collate([[a, b]], pad_id=2)
    assert real == 11 and positions[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert targets[0, :6].tolist() == [504, 3457, 314, 253, 2102, -100]
    with torch.no_grad():
        packed_logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([b.ids]), use_cache=False).logits[0]
    # b's logits are the same whether a sits before it in the row or not
    assert torch.allclose(packed_logits[6:], alone, atol=1e-4)


# -- the planner -------------------------------------------------------------------------------------
LLAMA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
    "vocab_size": 32000,
}
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
}


def test_planner_worked_example_7b_full_vs_lora_vs_qlora() -> None:
    from edgellm.plan.training import GiB, TrainSettings, TrainShape, plan_training

    shape = TrainShape.from_config(LLAMA_7B)
    assert 6.6e9 < shape.params < 6.8e9  # Llama-2-7B: 6.74B
    common = dict(
        rank=16, max_len=512, batch=1, gradient_checkpointing=True, trained_share=0.5, device="cuda"
    )
    full = plan_training(shape, TrainSettings(method="full", **common), 80 * GiB)
    lora = plan_training(shape, TrainSettings(method="lora", **common), 80 * GiB)
    qlora = plan_training(shape, TrainSettings(method="qlora", **common), 80 * GiB)
    # full: bf16 weights and gradients, fp32 AdamW moments: 12 bytes a parameter, ~76 GiB
    assert full.part("optimizer") == shape.params * 8 and full.part("gradients") == shape.params * 2
    assert 70 * GiB < full.total < 85 * GiB
    # LoRA: the bf16 weights (12.6 GiB) and a 40M-parameter adapter
    assert 39e6 < shape.lora_params(16, None) < 41e6
    assert 12.5 * GiB < lora.part("weights") < 12.7 * GiB and 13 * GiB < lora.total < 16 * GiB and lora.fits
    # QLoRA: 4.127 bits a linear weight, the embeddings in bf16
    assert 3.5 * GiB < qlora.part("weights") < 3.8 * GiB and 4 * GiB < qlora.total < 6.5 * GiB
    assert full.total > 5 * lora.total and lora.total > 2.5 * qlora.total


def test_planner_against_unsloths_table_for_llama_31_8b() -> None:
    """Unsloth's minimum VRAM: Llama-3.1-8B QLoRA 6 GB, LoRA 22 GB (their docs' table, batch 1
    with their gradient checkpointing, which also moves activations to RAM). The planner's figures at
    batch 1, checkpointed: QLoRA 7.2 GiB at 512 tokens (the 8B's 128k-word embeddings stay 16-bit),
    LoRA 17-19 GiB at 512-2048 tokens."""
    from edgellm.plan.training import GiB, TrainSettings, TrainShape, plan_training

    shape = TrainShape.from_config(LLAMA_31_8B)
    common = dict(
        rank=16, max_len=512, batch=1, gradient_checkpointing=True, trained_share=0.5, device="cuda"
    )
    qlora = plan_training(shape, TrainSettings(method="qlora", **common), 24 * GiB)
    lora = plan_training(shape, TrainSettings(method="lora", **common), 24 * GiB)
    longer = plan_training(shape, TrainSettings(method="lora", **{**common, "max_len": 2048}), 24 * GiB)
    assert 5 * GiB < qlora.total < 8 * GiB
    assert 16 * GiB < lora.total < longer.total < 22 * GiB


def test_auto_batch_and_nearest_fit() -> None:
    from edgellm.plan.training import GiB, TrainSettings, TrainShape, auto_batch, nearest_fit, plan_training

    shape = TrainShape.from_config(LLAMA_31_8B)
    wish = TrainSettings(method="lora", max_len=2048, batch=8, device="cuda")
    assert not plan_training(shape, wish, 24 * GiB).fits
    near = nearest_fit(shape, wish, 24 * GiB)
    assert near is not None and near.gradient_checkpointing and plan_training(shape, near, 24 * GiB).fits
    assert near.method == "lora"  # checkpointing and a smaller batch come before 4-bit weights
    small = nearest_fit(shape, wish, 8 * GiB)
    assert small is not None and small.method == "qlora"
    assert nearest_fit(shape, wish, 1 * GiB) is None
    batch = auto_batch(
        shape,
        TrainSettings(method="qlora", max_len=1024, gradient_checkpointing=True, device="cuda"),
        16 * GiB,
    )
    assert (
        batch >= 2
        and plan_training(
            shape,
            TrainSettings(
                method="qlora", max_len=1024, batch=batch, gradient_checkpointing=True, device="cuda"
            ),
            16 * GiB,
        ).fits
    )


def test_plan_finetune_cli(cli, smollm2_hf: Path) -> None:
    out = cli("plan", str(smollm2_hf), "--finetune", "--max-len", "256", "--batch", "4", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["fits"] and plan["batch"] == 4 and set(plan["parts"]) >= {"weights", "adapter", "activations"}
    tight = cli("plan", str(smollm2_hf), "--finetune", "--max-len", "1024", "--batch", "8", "--ram", "2GiB")
    assert tight.returncode == 1 and "does NOT fit" in tight.stdout and "nearest that fits" in tight.stdout
    model = cli("plan", "smollm2-135m-instruct", "--qlora")  # a training option on a model's plan
    assert model.returncode == 2 and "add --finetune" in model.stderr


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------
BAD = {
    "unknown-format": ('{"question": "a", "answer": "b"}\n', "line 1: unknown data format"),
    "empty-line": ('{"text": "a"}\n\n{"text": "b"}\n', "line 2 is empty"),
    "not-json": ('{"text": "a"}\n{"text": \n', "line 2 is not JSON"),
    "mixed": ('{"text": "a"}\n{"prompt": "a", "completion": "b"}\n', "line 2 is not in the file's format"),
    "no-assistant": ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message"),
    "bad-role": ('{"messages": [{"role": "wizard", "content": "hi"}]}\n', "unknown role"),
    "array": ("[1, 2]\n", "not an object"),
    "empty-file": ("", "is empty"),
    "deep": ('{"text": ' + "[" * 100000 + "]" * 100000 + "}\n", "line 1"),
}


@pytest.mark.parametrize("case", sorted(BAD), ids=sorted(BAD))
def test_bad_data_is_one_line_and_nothing_is_written(
    cli, smollm2_hf: Path, tmp_path: Path, case: str
) -> None:
    text, said = BAD[case]
    data = write(tmp_path / "bad.jsonl", raw=text)
    out = cli("finetune", str(smollm2_hf), str(data), "--steps", "1")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and said in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert tree(cli.home / "runs") == {}


def test_huge_line_and_fifo_are_refused(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "huge.jsonl", raw='{"text": "' + "a" * (5 << 20) + '"}\n')
    out = cli("finetune", str(smollm2_hf), str(data))
    assert out.returncode == 2 and "line 1 is over 4 MiB" in out.stderr
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    out = cli("finetune", str(smollm2_hf), str(fifo), timeout=60)
    assert out.returncode == 2 and "not a regular file" in out.stderr


def test_settings_the_model_cannot_take_are_refused(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    out = cli("finetune", str(smollm2_hf), str(FACTS), "--max-len", "100000")
    assert out.returncode == 2 and "--max-len 100000 is outside 16..8192" in out.stderr
    out = cli(
        "finetune",
        str(smollm2_hf),
        str(FACTS),
        "--targets",
        "nonexistent_proj",
        "--steps",
        "1",
        "--max-len",
        "64",
        "--batch",
        "1",
    )
    assert out.returncode == 1 and "PEFT cannot put a LoRA on this model's" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("finetune", str(tmp_path), str(FACTS))
    assert out.returncode != 0 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    # the plan is for the data's longest example (about 65 tokens here), not for --max-len
    out = cli("finetune", str(smollm2_hf), str(FACTS), "--ram", "1GiB", "--max-len", "1024")
    assert out.returncode == 2 and "1.0 GiB is free" in out.stderr
    assert "(try --batch 1 --qlora --gradient-checkpointing on)" in out.stderr
    assert tree(cli.home / "runs") == {}


# -- checkpoints: Ctrl-C, a killed run, --resume ---------------------------------------------------------
def _finetune(home: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update({"EDGELLM_HOME": str(home), "PYTHONPATH": str(ROOT)})
    return subprocess.Popen(
        [sys.executable, "-m", "edgellm", "finetune", *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
def test_ctrl_c_checkpoints_and_resume_continues_the_same_curve(home: Path, smollm2_hf: Path) -> None:
    args = [
        str(smollm2_hf),
        str(FACTS),
        "--max-len",
        "96",
        "--batch",
        "2",
        "--steps",
        "8",
        "--lr",
        "1e-3",
        "--save-every",
        "100",
        "--pack",
        "off",
    ]
    whole = _finetune(home, *args, "--name", "whole")
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err
    reference = [e["loss"] for e in _events(out) if e["event"] == "progress"]
    assert len(reference) == 8

    run = _finetune(home, *args, "--name", "stopped")
    seen = []
    for line in run.stdout:
        seen.append(json.loads(line))
        if seen[-1]["event"] == "progress" and seen[-1]["step"] == 3:
            run.send_signal(signal.SIGINT)
    err = run.stderr.read()
    run.wait(timeout=120)
    assert run.returncode == 130
    assert err.strip().splitlines()[-1].startswith("error: training stopped at step") and "--resume" in err
    stopped = home / "runs" / "stopped"
    assert not (stopped / "adapter").exists() and list((stopped / "checkpoints").iterdir())
    again = _finetune(home, *args, "--name", "stopped")  # without --resume: refused, nothing lost
    _, err = again.communicate(timeout=120)
    assert again.returncode == 1 and "--resume" in err

    resumed = _finetune(home, *args, "--name", "stopped", "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    steps = [e for e in _events(out) if e["event"] == "progress"]
    stop = max(e["step"] for e in seen if e["event"] == "progress")
    assert [e["step"] for e in steps] == list(range(stop + 1, 9))
    # the same batches in the same order: the curve goes on as the whole run's did (CPU matmuls on two
    # threads differ in their last bits, which four AdamW steps grow to about 1%)
    assert [e["loss"] for e in steps] == pytest.approx(reference[stop:], rel=3e-2)
    record = json.loads((stopped / "adapter" / "edgellm-run.json").read_text())
    assert record["steps"] == 8 and record["final_loss"] == pytest.approx(reference[-1], rel=3e-2)
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(stopped / "adapter").r == 16  # PEFT loads the folder as it is


# -- the whole flow on a real model ------------------------------------------------------------------------
def _answers(cli, model: str, questions: list[dict], *options: str) -> int:
    right = 0
    for q in questions:
        out = cli(
            "run",
            model,
            q["messages"][0]["content"],
            "--temperature",
            "0",
            "-n",
            "24",
            "--ctx",
            "512",
            *options,
        )
        assert out.returncode == 0, out.stderr
        right += q["expect"].lower() in out.stdout.lower()
    return right


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
def test_finetune_teaches_facts_and_exports_a_gguf_that_knows_them(
    cli, smollm2_hf: Path, smollm2: Path
) -> None:
    questions = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    before = _answers(cli, str(smollm2), questions)
    out = cli(
        "finetune",
        str(smollm2_hf),
        str(FACTS),
        "--eval",
        str(HELD_OUT),
        "--name",
        "veltrana",
        "--max-len",
        "256",
        "--batch",
        "4",
        "--epochs",
        "4",
        "--lr",
        "2e-3",
        "--export",
        "Q8_0",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "36 examples (messages)" in out.stdout and "trained" in out.stdout and "memory:" in out.stdout
    assert "┤" in out.stdout  # the loss curve
    record = json.loads((cli.home / "runs" / "veltrana" / "adapter" / "edgellm-run.json").read_text())
    (first_step, first), (_, last) = record["eval_losses"][0], record["eval_losses"][-1]
    assert first_step == 0 and last < first / 3
    exported = next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("exported:"))
    after = _answers(cli, exported, questions)
    print(
        f"held-out questions right: base {before}/12, fine-tuned {after}/12; "
        f"eval loss {first:.3f} -> {last:.3f}"
    )
    assert before <= 2 and after >= 10
    # the adapter alone as a GGUF LoRA, applied at load time to the bundled Q4_1 model it came from
    lora = cli.cwd / "veltrana-lora.gguf"
    made = cli("export", "veltrana", "--lora-gguf", str(lora))
    assert made.returncode == 0 and lora.is_file(), made.stderr
    with_lora = _answers(cli, str(smollm2), questions, "--lora", str(lora))
    print(f"the bundled Q4_1 with the GGUF LoRA: {with_lora}/12")
    assert with_lora >= 8
    # the exported GGUF answers as PEFT's merged model does in transformers (Q8_0: the same top token)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.test_convert import gguf_logits, hf_ids

    prompts = [q["messages"][0]["content"] for q in questions[:5]]
    ids = hf_ids(smollm2_hf, prompts)
    base = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, cli.home / "runs" / "veltrana" / "adapter").merge_and_unload()
    with torch.no_grad():
        theirs = [merged(torch.tensor([seq])).logits[0, -1].numpy() for seq in ids]
    ours = gguf_logits(next((cli.home / "models" / exported).glob("*.gguf")), ids)
    assert [int(t.argmax()) for t in theirs] == [int(o.argmax()) for o in ours]


# -- the planner against what a run measures --------------------------------------------------------------
# Runs whose peak is training's. A run of a few hundred tokens peaks while loading, which varies
# from one process to the next (SmolLM2 fp32 at 1 x 128: 1486 to 1684 MiB in the same checkout).
PLANNED_RUNS = {  # (model fixture, batch, max-len, rank, extra options)
    "smollm2-bf16-b4x128-r16": (
        "smollm2_hf",
        4,
        128,
        16,
        ["--dtype", "bf16", "--gradient-checkpointing", "off"],
    ),
    "smollm2-fp32-b2x256-r64": (
        "smollm2_hf",
        2,
        256,
        64,
        ["--dtype", "fp32", "--gradient-checkpointing", "off"],
    ),
    "smollm2-fp32-b4x128-r16": (
        "smollm2_hf",
        4,
        128,
        16,
        ["--dtype", "fp32", "--gradient-checkpointing", "off"],
    ),
    "smollm2-bf16-checkpointed-b4x256": (
        "smollm2_hf",
        4,
        256,
        16,
        ["--dtype", "bf16", "--gradient-checkpointing", "on"],
    ),
    "smollm2-bf16-qlora-b4x128": ("smollm2_hf", 4, 128, 16, ["--dtype", "bf16", "--qlora"]),
    "gemma3-bf16-b2x128-r16": (
        "gemma3_hf",
        2,
        128,
        16,
        ["--dtype", "bf16", "--gradient-checkpointing", "off"],
    ),
}


@pytest.fixture(scope="module")
def long_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Examples longer than any max-len here: every row is full, as the planner assumes."""
    import random

    rng = random.Random(0)
    words = "the of and a to in is was for on that with as by at from it an were are which this be".split()
    path = tmp_path_factory.mktemp("data") / "long.jsonl"
    return write(path, *({"text": " ".join(rng.choice(words) for _ in range(1500))} for _ in range(32)))


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
@pytest.mark.parametrize("case", sorted(PLANNED_RUNS), ids=sorted(PLANNED_RUNS))
def test_planned_memory_is_within_10_percent_of_the_measured_peak(
    cli, request, long_text: Path, case: str
) -> None:
    fixture, batch, length, rank, extra = PLANNED_RUNS[case]
    base = request.getfixturevalue(fixture)
    out = cli(
        "finetune",
        str(base),
        str(long_text),
        "--name",
        "m",
        "--batch",
        str(batch),
        "--max-len",
        str(length),
        "--rank",
        str(rank),
        "--steps",
        "5",
        "--pack",
        "on",
        *extra,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    planned = json.loads((cli.home / "runs" / "m" / "run.json").read_text())["planned_memory"]
    measured = json.loads((cli.home / "runs" / "m" / "adapter" / "edgellm-run.json").read_text())[
        "peak_memory"
    ]
    print(f"{case}: planned {planned >> 20} MiB, peak RSS {measured >> 20} MiB ({planned / measured:.3f})")
    assert abs(planned - measured) <= 0.10 * measured


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
def test_two_processes_over_gloo_train_as_one(home: Path, smollm2_hf: Path) -> None:
    """--devices 2: accelerate's launcher starts two processes on this CPU (gloo); each takes half of
    every step's rows, and the run follows the one-process run with the same rows per step."""
    curves = {}
    for devices, batch in ((1, 4), (2, 2)):
        run = _finetune(
            home,
            str(smollm2_hf),
            str(FACTS),
            "--name",
            f"d{devices}",
            "--devices",
            str(devices),
            "--batch",
            str(batch),
            "--steps",
            "3",
            "--max-len",
            "96",
            "--pack",
            "off",
            "--lr",
            "1e-3",
        )
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        progress = [e for e in _events(out) if e["event"] == "progress"]
        assert [e["step"] for e in progress] == [1, 2, 3]  # reported once, by the first process
        curves[devices] = [(e["loss"], e["tokens"]) for e in progress]
    assert [t for _, t in curves[2]] == [t for _, t in curves[1]]  # the same rows each step
    assert [v for v, _ in curves[2]] == pytest.approx([v for v, _ in curves[1]], rel=2e-2)
    record = json.loads((home / "runs" / "d2" / "adapter" / "edgellm-run.json").read_text())
    assert record["devices"] == 2 and record["steps"] == 3


@pytest.fixture(scope="module")
def smollm2_bnb4(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 as the *-bnb-4bit repos ship it: NF4 with double quantization, saved by transformers."""
    from tests.quant_fixtures import bnb_checkpoint

    return bnb_checkpoint(smollm2_hf, tmp_path_factory.mktemp("bnb") / "smollm2-bnb-4bit", "nf4-dq")


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
def test_a_bnb_4bit_checkpoint_trains_on_its_own_weights(cli, smollm2_bnb4: Path, smollm2_hf: Path) -> None:
    out = cli(
        "finetune",
        str(smollm2_bnb4),
        str(FACTS),
        "--name",
        "q4",
        "--steps",
        "2",
        "--max-len",
        "96",
        "--batch",
        "2",
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (
        "the base is bitsandbytes 4-bit: QLoRA on its own weights" in out.stdout and "(qlora," in out.stdout
    )
    record = json.loads((cli.home / "runs" / "q4" / "adapter" / "edgellm-run.json").read_text())
    assert record["base_4bit"] and record["method"] == "qlora"
    # into the 4-bit weights it trained against, dequantized (bench/qlora_merge.py measured it the
    # nearer), or into the 16-bit base when named
    done = cli("export", "q4", "Q8_0", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("q4-q8_0: llama")
    sixteen = cli("export", "q4", "Q8_0", "--name", "q4-16", "--base-16bit", str(smollm2_hf), timeout=300)
    assert sixteen.returncode == 0, sixteen.stderr
    assert sixteen.stdout.startswith("q4-16: llama")
    dequantized, base = (read_header(next((cli.home / "models" / n).glob("*.gguf"))) for n in ("q4-q8_0", "q4-16"))
    assert dequantized.metadata["edgellm.source.quantization"] == "bitsandbytes nf4"
    assert "edgellm.source.quantization" not in base.metadata


def test_other_quantized_checkpoints_are_refused_for_training(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gptq"
    folder.mkdir()
    for f in smollm2_hf.iterdir():
        (folder / f.name).symlink_to(f)
    config = json.loads((smollm2_hf / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    out = cli("finetune", str(folder), str(FACTS), "--steps", "1")
    assert out.returncode == 1 and "cannot train on a gptq quantized checkpoint" in out.stderr
    assert tree(cli.home / "runs") == {}


def _linked_copy(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for f in src.iterdir():
        (dest / f.name).symlink_to(f)
    return dest


def test_a_template_that_cannot_render_the_data_is_one_line(cli, smollm2_hf: Path, tmp_path: Path) -> None:
    folder = _linked_copy(smollm2_hf, tmp_path / "strict")
    (folder / "chat_template.jinja").unlink()
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('users are not allowed') }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    out = cli("finetune", str(folder), str(FACTS), "--steps", "1")
    assert out.returncode == 2, out.stderr
    assert "line 1: the chat template cannot render this conversation" in out.stderr
    assert "users are not allowed" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert tree(cli.home / "runs") == {}


def test_no_disk_for_checkpoints_and_the_eval_split(home: Path, smollm2_hf: Path, monkeypatch) -> None:
    """A full disk cannot be made here: shutil.disk_usage is replaced (a stand-in, named so) to say
    1 MiB is free. The run is refused before anything is loaded or written."""
    import shutil
    from collections import namedtuple

    from edgellm.config import Settings
    from edgellm.errors import StorageError
    from edgellm.models import store_for
    from edgellm.system.hardware import probe
    from edgellm.workflows import Finetune, Job, plan_finetune

    settings = Settings.resolve()
    store, hw = store_for(settings), probe()
    split = plan_finetune(
        Finetune(base=str(smollm2_hf), data=FACTS, eval_split=0.25, max_len=128),
        store,
        settings.runs_dir,
        settings.checkpoints_dir,
        hw,
        Job(),
    )
    assert len(split.data.examples) == 27 and len(split.eval_data.examples) == 9
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    with pytest.raises(StorageError, match="1.0 MiB free; the run's checkpoints need"):
        plan_finetune(
            Finetune(base=str(smollm2_hf), data=FACTS, max_len=128),
            store,
            settings.runs_dir,
            settings.checkpoints_dir,
            hw,
            Job(),
        )
    assert tree(settings.runs_dir) == {}


@pytest.mark.slow
@pytest.mark.timeout(900)  # several training runs; minutes on a busy 2-core machine
def test_a_killed_run_resumes_from_its_last_checkpoint(home: Path, smollm2_hf: Path) -> None:
    # the 8-bit AdamW's state is checkpointed and resumed too
    options = "--name killed --max-len 96 --batch 2 --steps 6 --save-every 2 --pack off --optim adamw-8bit"
    args = [str(smollm2_hf), str(FACTS), *options.split()]
    run = _finetune(home, *args)
    for line in run.stdout:
        if json.loads(line)["event"] == "saved":
            run.kill()  # SIGKILL: no handler runs, no checkpoint is written on the way out
            break
    run.wait(timeout=60)
    run.stdout.close()
    run.stderr.close()
    folder = home / "runs" / "killed"
    assert not (folder / "adapter").exists()
    assert [p.name for p in (folder / "checkpoints").iterdir() if p.name.startswith("step-")] == [
        "step-000002"
    ]
    resumed = _finetune(home, *args, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert [e["step"] for e in _events(out) if e["event"] == "progress"] == [3, 4, 5, 6]
    assert json.loads((folder / "adapter" / "edgellm-run.json").read_text())["steps"] == 6
