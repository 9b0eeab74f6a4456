"""Quantization and evaluation on the real SmolLM2, through llama.cpp's own quantizer.

The F16 input is SmolLM2 dequantized from the shipped Q4_1 by llama.cpp's quantizer itself (the
converter that makes F16 from Hugging Face checkpoints is a separate capability). The evaluation
text is CPython's own documentation: ``pydoc_data.topics`` ships with every Python.
"""

from __future__ import annotations

import _thread
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError, UsageError
from edgellm.gguf.header import read_header
from edgellm.gguf.quant_types import quant_type
from edgellm.quantize import quantize
from tests.conftest import tree

BPW_BOUNDS = {"Q8_0": (8.0, 9.0), "Q4_K_M": (4.5, 7.0), "Q2_K": (3.0, 6.0)}


@pytest.mark.slow
def test_quantize_ladder_types_sizes_chat_and_quality(cli, home: Path, f16_in_store: str, english: Path) -> None:
    params = read_header(home / "models" / "smol-f16" / "SmolLM2-135M-Instruct-F16.gguf").parameter_count
    sizes = {}
    for qtype in BPW_BOUNDS:
        r = cli("quantize", f16_in_store, qtype.lower())
        assert r.returncode == 0, r.stderr
        name = f"smol-{qtype.lower()}"
        assert r.stdout.startswith(f"{name}: 258.3 MiB -> ")
        manifest = json.loads((home / "models" / name / "manifest.json").read_text())
        assert manifest["quantization"] == qtype
        header = read_header(home / "models" / name / manifest["file"])
        assert header.quantization == qtype
        bpw = header.file_size * 8 / params
        low, high = BPW_BOUNDS[qtype]
        assert low <= bpw <= high, (qtype, bpw)
        sizes[qtype] = header.file_size
        answer = cli("run", name, "What is the capital of Germany?", "-n", "12", "--temperature", "0")
        assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
    assert sizes["Q2_K"] < sizes["Q4_K_M"] < sizes["Q8_0"]

    ppl = {}
    for name in ("smol-f16", "smol-q8_0", "smol-q4_k_m", "smol-q2_k"):
        r = cli("eval", name, "--text", str(english), "--ctx", "128", "--chunks", "16", "--base", "smol-f16", "--json")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout)
        ppl[name] = result["perplexity"]
        if name == "smol-f16":  # a model against itself
            assert result["kl_mean"] == pytest.approx(0.0, abs=1e-9)
            assert result["top1_agreement"] == 1.0
        else:
            assert result["kl_mean"] > 0
    assert ppl["smol-q8_0"] <= ppl["smol-q4_k_m"] <= ppl["smol-q2_k"]
    assert abs(ppl["smol-q8_0"] / ppl["smol-f16"] - 1) < 0.01


def test_sweep_prints_the_ladder(cli, f16_in_store: str, english: Path) -> None:
    r = cli("quantize", f16_in_store, "--sweep", "Q8_0,Q2_K", "--text", str(english), "--ctx", "128", "--chunks", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split() == ["TYPE", "IMATRIX", "SIZE", "BITS/W", "PPL", "KL", "TOP-1", "TG", "T/S"]
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["base", "Q8_0", "Q2_K"]
    assert rows[0][-3] == "0.0000" and rows[0][-2] == "100.0%"  # the base against itself
    assert float(rows[2][-4]) > float(rows[1][-4])  # Q2_K's perplexity above Q8_0's


@pytest.mark.slow
def test_quantize_a_hf_checkpoint_folder_in_one_command(cli, home: Path, smollm2_hf: Path, tmp_path: Path) -> None:
    folder = tmp_path / "SmolLM2-135M-Instruct"
    folder.symlink_to(smollm2_hf, target_is_directory=True)
    r = cli("quantize", str(folder), "Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr and r.stdout.startswith("smollm2-135m-instruct-q4_k_m: ")
    assert [p.name for p in (home / "models").iterdir()] == ["smollm2-135m-instruct-q4_k_m"]  # no F16 left over
    header = read_header(next((home / "models" / "smollm2-135m-instruct-q4_k_m").glob("*.gguf")))
    assert header.quantization == "Q4_K_M"
    answer = cli("run", "smollm2-135m-instruct-q4_k_m", "--temp", "0", "-n", "8", "What is the capital of Germany?")
    assert "Berlin" in answer.stdout


def test_list_types(cli) -> None:
    r = cli("quantize", "--list")
    assert r.returncode == 0
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:]}
    for name in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
                 "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "F16", "BF16", "F32"):
        assert name in rows
    assert rows["Q4_K_M"].split()[1] == "4.90"
    assert "needs an importance matrix" in rows["IQ2_XS"]


def _hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


REFUSALS = {
    "unknown type": (lambda t, m: ["quantize", m, "Q9_X"], "unknown quantization type 'Q9_X' (choose one of Q2_K"),
    "needs imatrix": (lambda t, m: ["quantize", m, "iq2_xxs"], "IQ2_XXS needs an importance matrix"),
    "requantize": (lambda t, m: ["quantize", "smollm2-135m-instruct", "q8_0"], "is already quantized (Q4_1)"),
    "output is input": (lambda t, m: ["quantize", m, "q8_0", "-o", m], "is the input itself"),
    "not gguf": (lambda t, m: ["quantize", str(_notes(t)), "q8_0"], "notes.gguf is not a GGUF file"),
    "broken hf folder": (lambda t, m: ["quantize", str(_hf_folder(t)), "q8_0"], "checkpoint has no safetensors weights"),
    "missing type": (lambda t, m: ["quantize", m], "TYPE is missing"),
    "sweep without text": (lambda t, m: ["quantize", m, "--sweep", "Q8_0"], "--sweep needs --text"),
}


def _notes(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("not a model")
    return path


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_leave_nothing_behind(case: str, cli, home: Path, tmp_path: Path, smollm2_f16: Path) -> None:
    make_args, message = REFUSALS[case]
    source = tmp_path / "src" / smollm2_f16.name
    source.parent.mkdir()
    shutil.copyfile(smollm2_f16, source)
    args = make_args(tmp_path, str(source))
    cli("show", "smollm2-135m-instruct")  # registers the bundled model, for the requantize case
    before_home, before_tmp = tree(home), tree(tmp_path)
    r = cli(*args)
    assert r.returncode in (1, 2)
    assert message in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    assert tree(home) == before_home and tree(tmp_path) == before_tmp


def test_too_little_disk_space(smollm2_f16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(EdgeLLMError, match="not enough disk space .* MiB needed, 0 MiB free"):
        quantize(read_header(smollm2_f16), quant_type("Q8_0"), tmp_path / "out.gguf")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_leaves_no_partial_file(smollm2_f16: Path, tmp_path: Path) -> None:
    started = threading.Event()

    def interrupt_when_started() -> None:
        # at the first tensor llama.cpp logs, or 0.3 s in (Q4_K_M of this model takes 1-2 s on one
        # thread): mid-quantization either way, even where the log's lines do not come
        started.wait(0.3)
        _thread.interrupt_main()

    # Ctrl-C as Python has it, whatever handler an earlier test's library left in this process
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt_when_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        quantize(
            read_header(smollm2_f16), quant_type("Q4_K_M"), tmp_path / "out.gguf", threads=1,
            on_tensor=lambda i, n, name: started.set(),
        )
    assert list(tmp_path.iterdir()) == []
    signal.signal(signal.SIGINT, previous)
    # llama.cpp cannot be stopped mid-file: its thread finishes into the deleted file; let it end
    # so that its log lines do not reach later tests
    for thread in threading.enumerate():
        if thread.name == "llama-quantize":
            thread.join(60)
            assert not thread.is_alive()
    assert list(tmp_path.iterdir()) == []


def test_quantize_to_a_file_with_tensor_type_overrides(smollm2_f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4_0.gguf"
    seen = []
    result = quantize(
        read_header(smollm2_f16), quant_type("q4_0"), out, output_tensor_type="q8_0", token_embedding_type="q8_0",
        on_tensor=lambda i, n, name: seen.append((i, n)),
    )
    assert result.size_after == out.stat().st_size < result.size_before
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # readable as any new file is, not owner-only
    assert sorted(seen) == [(i, 272) for i in range(1, 273)]  # every tensor reported once
    types = {t.name: t.type_name for t in read_header(out).tensors}
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] in ("Q4_0", "Q5_0", "Q8_0")  # 576-wide rows may fall back
    with pytest.raises(UsageError, match="unknown tensor type 'q3_x'"):
        quantize(read_header(smollm2_f16), quant_type("q4_0"), tmp_path / "x.gguf", output_tensor_type="q3_x")


def test_eval_json_and_short_text(cli, smollm2: Path, english: Path, tmp_path: Path) -> None:
    r = cli("eval", str(smollm2), "--text", str(english), "--ctx", "128", "--chunks", "2", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["chunks"] == 2 and result["scored_tokens"] == 2 * 63
    assert 2 < result["perplexity"] < 100
    assert result["kl_mean"] is None
    short = tmp_path / "short.txt"
    short.write_text("Too short to measure anything.")
    r = cli("eval", str(smollm2), "--text", str(short), "--ctx", "128")
    assert r.returncode == 2
    assert "needs at least 256" in r.stderr
