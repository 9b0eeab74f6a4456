"""Importance matrices on the real SmolLM2: what they hold, the files, and the quantizations they unlock.

The values are held against transformers running the same checkpoint on the same tokens (each
weight's inputs, squared and summed, through forward hooks); agreement with llama-imatrix itself,
value by value and byte for byte after llama-quantize, is ``bench/imatrix.py``'s (it needs the
reference tools built from source).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from edgellm.errors import Cancelled
from edgellm.gguf.header import read_header
from edgellm.imatrix import calibration_text, compute_imatrix, load_imatrix

N_CTX = 128

HF_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edgellm.convert import convert

    return convert(smollm2_hf, tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf", "f32").path


@pytest.fixture(scope="module")
def imatrix_file(cli, smollm2_f16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("imatrix") / "smol.imatrix.gguf"
    r = cli("imatrix", str(smollm2_f16), "--chunks", "4", "-c", str(N_CTX), "-o", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{path}: 210 weights, 4 chunks of {N_CTX} tokens from edgellm calibration text"
    return path


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory):
    """One EDGELLM_HOME for the module: the quantizations below share the imported F16."""
    from tests.conftest import CLI

    root = tmp_path_factory.mktemp("imatrix-home")
    return CLI(root / "home", root)


def test_each_weight_holds_its_inputs_squared_summed_as_transformers_computes_them(
        smollm2_f32: Path, smollm2_hf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.runtime.native import NativeModel

    text = calibration_text()
    matrix = compute_imatrix(smollm2_f32, text, n_ctx=N_CTX, chunks=2, threads=2)
    with NativeModel(smollm2_f32) as native:
        tokens = native.tokenize(text, add_special=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    sums: dict[str, np.ndarray] = {}

    def hook(name: str):
        def record(module, args) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
        return record

    for i, layer in enumerate(model.model.layers):
        for module, short in HF_LINEARS.items():
            layer.get_submodule(module).register_forward_pre_hook(hook(f"blk.{i}.{short}.weight"))
    with torch.no_grad():
        for c in range(2):
            model(torch.tensor([tokens[c * N_CTX : (c + 1) * N_CTX]]))

    assert sorted(matrix.sums) == sorted(sums)  # every projection of every layer, output.weight not
    for name, expected in sums.items():
        assert matrix.counts[name].tolist() == [2 * N_CTX], name
        ours = matrix.sums[name][0]
        assert np.abs(ours - expected).max() <= 3e-3 * np.abs(expected).max(), name


def test_the_file_is_llama_imatrix_format_and_reads_back(imatrix_file: Path) -> None:
    header = read_header(imatrix_file, model=False)
    assert header.metadata["general.type"] == "imatrix"
    assert header.metadata["imatrix.chunk_count"] == 4
    assert header.metadata["imatrix.chunk_size"] == N_CTX
    assert header.metadata["imatrix.datasets"].values == ("edgellm calibration text",)
    names = [t.name for t in header.tensors]  # per weight in name order, its sums then its counts
    weights = [name.removesuffix(".in_sum2") for name in names[::2]]
    assert weights == sorted(weights) and len(weights) == 210
    assert names[1::2] == [f"{w}.counts" for w in weights]
    down = {t.name: t for t in header.tensors}
    assert down["blk.0.ffn_down.weight.in_sum2"].shape == (1536, 1)
    assert down["blk.0.ffn_down.weight.counts"].shape == (1, 1)
    matrix = load_imatrix(imatrix_file)
    assert matrix.counts["blk.29.attn_q.weight"].tolist() == [4 * N_CTX]
    means = matrix.normalized()["blk.29.attn_q.weight"]
    assert means.dtype == np.float32 and means.shape == (576,) and (means > 0).all()


def test_iq_types_need_an_imatrix_and_take_it(cli, smollm2_f16: Path, imatrix_file: Path, tmp_path: Path) -> None:
    refused = cli("quantize", str(smollm2_f16), "IQ2_XS", "-o", str(tmp_path / "x.gguf"))
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: IQ2_XS needs an importance matrix")
    assert "--calibration" in refused.stderr and "edgellm imatrix MODEL" in refused.stderr
    assert not (tmp_path / "x.gguf").exists()

    out = tmp_path / "smol-iq2_xs.gguf"
    r = cli("quantize", str(smollm2_f16), "IQ2_XS", "--imatrix", str(imatrix_file), "-o", str(out))
    assert r.returncode == 0, r.stderr
    header = read_header(out)
    types = {t.name: t.type_name for t in header.tensors}
    assert types["blk.5.ffn_down.weight"] == "IQ2_XS"  # 1536-wide rows take the 256-weight IQ blocks
    assert types["blk.5.attn_q.weight"] == "IQ4_NL"  # 576-wide rows fall back, as llama.cpp's log says
    assert "fell back (rows not a multiple of the block): iq2_xs -> iq4_nl" in r.stderr
    assert header.metadata["quantize.imatrix.file"] == str(imatrix_file)
    assert header.metadata["quantize.imatrix.dataset"] == "edgellm calibration text"
    assert header.metadata["quantize.imatrix.entries_count"] == 210
    assert header.metadata["quantize.imatrix.chunks_count"] == 4
    answer = cli("run", str(out), "What is the capital of France?", "-n", "8", "--temperature", "0")
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr


def test_a_matrix_read_once_serves_every_quantization(smollm2_f16: Path, imatrix_file: Path, tmp_path: Path) -> None:
    """A sweep quantizes to several types from one matrix: it is read once (an MoE model's can be
    gigabytes), so the file is not needed again, and each output still names it."""
    from edgellm.gguf.quant_types import quant_type
    from edgellm.quantize import quantize

    copy = tmp_path / "kept.imatrix.gguf"
    copy.write_bytes(imatrix_file.read_bytes())
    matrix = load_imatrix(copy)
    copy.unlink()
    outputs = [tmp_path / f"{n}.gguf" for n in ("first", "second")]
    for out in outputs:
        quantize(read_header(smollm2_f16), quant_type("Q2_K"), out, imatrix=matrix)
        assert read_header(out).metadata["quantize.imatrix.file"] == str(copy)
    assert outputs[0].read_bytes() == outputs[1].read_bytes()


def test_tensor_types_choose_per_tensor(cli, smollm2_f16: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.gguf"
    r = cli("quantize", str(smollm2_f16), "Q4_0", "--tensor-type", "attn_v=q8_0", "--tensor-type",
            r"blk\.1[0-9]\.ffn_down=f16", "--token-embedding-type", "q8_0", "-o", str(out))
    assert r.returncode == 0, r.stderr
    types = {t.name: t.type_name for t in read_header(out).tensors}
    assert types["blk.3.attn_v.weight"] == "Q8_0" and types["blk.3.attn_k.weight"] == "Q4_0"
    assert types["blk.12.ffn_down.weight"] == "F16" and types["blk.2.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == "Q8_0"
    for bad, message in (("attn_v", "is not PATTERN=TYPE"), ("attn_v=q9_z", "unknown tensor type 'q9_z'"),
                         ("blk.(=q8_0", "the pattern is not a regular expression")):
        r = cli("quantize", str(smollm2_f16), "Q4_0", "--tensor-type", bad, "-o", str(tmp_path / "bad.gguf"))
        assert r.returncode == 2 and message in r.stderr, (bad, r.stderr)
        assert "Traceback" not in r.stderr and not (tmp_path / "bad.gguf").exists()


def test_calibration_makes_one_imatrix_and_the_sweep_shows_what_it_buys(cli, smollm2_f16: Path,
                                                                         english: Path) -> None:
    assert cli("import", str(smollm2_f16), "--name", "smol-f16").returncode == 0
    r = cli("quantize", "smol-f16", "IQ3_XXS", "--calibration")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("smol-iq3_xxs-imat: 258.3 MiB -> ")
    kept = list((cli.home / "models" / ".imatrix").iterdir())
    assert len(kept) == 1 and load_imatrix(kept[0]).chunk_count == 14  # the whole calibration text

    r = cli("quantize", "smol-f16", "--sweep", "Q2_K,IQ3_XXS", "--calibration", "--text", str(english),
            "--ctx", str(N_CTX), "--chunks", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert list((cli.home / "models" / ".imatrix").iterdir()) == kept  # made once, reused
    rows = {(row["type"], row["imatrix"]): row for row in json.loads(r.stdout)}
    assert sorted(rows) == [("IQ3_XXS", True), ("Q2_K", False), ("Q2_K", True), ("base", False)]
    assert rows[("base", False)]["kl_divergence"] == pytest.approx(0, abs=1e-9)
    assert rows[("Q2_K", True)]["kl_divergence"] < rows[("Q2_K", False)]["kl_divergence"]
    assert rows[("IQ3_XXS", True)]["size"] < rows[("Q2_K", False)]["size"]
    assert rows[("IQ3_XXS", True)]["kl_divergence"] < rows[("Q2_K", False)]["kl_divergence"]
    listed = cli("ls").stdout
    assert "smol-q2_k " in listed and "smol-q2_k-imat" in listed and "smol-iq3_xxs-imat" in listed


@pytest.mark.parametrize("content, message", [
    (b"not a gguf at all", "is not an importance matrix"),
    (None, "is a GGUF but not an importance matrix"),  # a model given as the imatrix
])
def test_a_file_that_is_not_an_imatrix_is_refused_in_one_line(cli, smollm2_f16: Path, smollm2: Path,
                                                              tmp_path: Path, content, message) -> None:
    path = tmp_path / "bad.gguf"
    if content is None:
        path = smollm2
    else:
        path.write_bytes(content)
    r = cli("quantize", str(smollm2_f16), "IQ2_XS", "--imatrix", str(path), "-o", str(tmp_path / "out.gguf"))
    assert r.returncode == 1, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out.gguf").exists()


def test_a_damaged_imatrix_is_refused(imatrix_file: Path, tmp_path: Path) -> None:
    from edgellm.errors import ImatrixError

    matrix = load_imatrix(imatrix_file)
    broken = tmp_path / "broken.gguf"
    matrix.save(broken)
    data = bytearray(broken.read_bytes())
    at = data.index(b"blk.0.attn_k.weight.counts")
    data[at : at + 26] = b"blk.0.attn_k.weight.countX"
    broken.write_bytes(bytes(data))
    with pytest.raises(ImatrixError, match="has sums but no counts for blk.0.attn_k.weight"):
        load_imatrix(broken)
    matrix.sums["blk.3.ffn_up.weight"][0, 7] = np.nan
    matrix.save(broken)
    with pytest.raises(ImatrixError, match="blk.3.ffn_up.weight has values that are not finite"):
        load_imatrix(broken)


def test_cancelling_stops_between_chunks(smollm2: Path) -> None:
    cancel = threading.Event()
    seen = []

    def progress(done: int, total: int, rate: float) -> None:
        seen.append((done, total, rate > 0))
        cancel.set()

    with pytest.raises(Cancelled):
        compute_imatrix(smollm2, calibration_text(), n_ctx=N_CTX, threads=2, on_progress=progress, cancel=cancel)
    assert seen == [(16, 58, True)]  # 16 chunks of 128 tokens fill one 2048-token batch


def mixture_of_experts(src: Path, dest: Path, n_layers: int = 2, n_expert: int = 4, n_used: int = 2) -> Path:
    """A small Mixtral-shaped model from SmolLM2's own weights: its first layers, each FFN copied
    into ``n_expert`` experts behind a random router (no MoE checkpoint ships on PyPI)."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dest, "llama")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name not in ("general.architecture", "llama.block_count"):
            vtype = field.types[0]
            writer.add_key_value(name, field.contents(), vtype,
                                 sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    writer.add_block_count(n_layers)
    writer.add_expert_count(n_expert)
    writer.add_expert_used_count(n_used)
    rng = np.random.default_rng(0)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= n_layers:
            continue
        part = tensor.name.split(".")[-2] if tensor.name.startswith("blk.") else ""
        data = np.asarray(tensor.data)
        if part in ("ffn_gate", "ffn_up", "ffn_down"):
            writer.add_tensor(tensor.name.replace(part, part + "_exps"), np.stack([data] * n_expert))
            if part == "ffn_gate":
                writer.add_tensor(tensor.name.replace(part, "ffn_gate_inp"),
                                  rng.normal(0, 1, (n_expert, data.shape[1])).astype(np.float32))
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_experts_each_get_the_tokens_routed_to_them(cli, smollm2_f16: Path, tmp_path: Path) -> None:
    moe = mixture_of_experts(smollm2_f16, tmp_path / "moe.gguf")
    matrix = compute_imatrix(moe, calibration_text(), n_ctx=N_CTX, chunks=2, threads=2)
    for layer in (0, 1):
        gate = f"blk.{layer}.ffn_gate_exps.weight"
        counts = matrix.counts[gate]
        assert counts.sum() == 2 * N_CTX * 2  # every token, to two experts
        assert (counts > 0).sum() >= 2 and len(set(counts.tolist())) > 1  # routed, not shared out evenly
        assert matrix.sums[gate].shape == (4, 576)
        assert matrix.sums[f"blk.{layer}.ffn_down_exps.weight"].shape == (4, 1536)
        assert matrix.counts[f"blk.{layer}.attn_q.weight"].tolist() == [2 * N_CTX]
    path = tmp_path / "moe.imatrix.gguf"
    matrix.save(path)
    out = tmp_path / "moe-iq2_xs.gguf"
    r = cli("quantize", str(moe), "IQ2_XS", "--imatrix", str(path), "-o", str(out))
    assert r.returncode == 0, r.stderr
    types = {t.name: t.type_name for t in read_header(out).tensors}
    assert types["blk.1.ffn_down_exps.weight"] == "IQ2_XS"


def test_an_output_that_cannot_be_written_is_refused_before_the_work(cli, smollm2_f16: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args in (["imatrix", str(smollm2_f16), "-o", str(blocker / "x.gguf")],
                 ["quantize", str(smollm2_f16), "Q8_0", "-o", str(blocker / "x.gguf")]):
        r = cli(*args)
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip().splitlines()[-1] == f"error: cannot write {blocker / 'x.gguf'}: File exists"
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr


def test_a_hostile_or_foreign_matrix_is_refused_before_quantizing(cli, smollm2_f16: Path, imatrix_file: Path,
                                                                   tmp_path: Path) -> None:
    """Sums of squares below zero (llama.cpp's IQ2_XS quantizer aborted the process on them; Q4_K_S
    took them and the model answered 'ppoppoppo'), and a matrix that covers 1 of the model's 210
    layer weights (used without a word before)."""
    matrix = load_imatrix(imatrix_file)
    negative = tmp_path / "negative.gguf"
    for name in matrix.sums:
        matrix.sums[name][:] = -1.0
    matrix.save(negative)
    one = load_imatrix(imatrix_file)
    kept = "blk.0.attn_q.weight"
    one.sums, one.counts = {kept: one.sums[kept]}, {kept: one.counts[kept]}
    foreign = tmp_path / "one-tensor.gguf"
    one.save(foreign)
    for path, qtype, message in ((negative, "IQ2_XS", "has negative sums of squared activations"),
                                 (negative, "Q4_K_S", "has negative sums of squared activations"),
                                 (foreign, "Q4_K_S", "covers 1 of the 210 layer weights")):
        out = tmp_path / f"{qtype}.gguf"
        r = cli("quantize", str(smollm2_f16), qtype, "--imatrix", str(path), "-o", str(out))
        assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
        assert not out.exists()


def test_a_killed_writers_leftovers_beside_the_output_are_removed(cli, smollm2_f16: Path, tmp_path: Path) -> None:
    """`imatrix -o FILE` killed while writing left `.edgellm-tmp-*` beside FILE for good: the store's
    sweep never looks there. The next write into that folder removes a dead writer's temporaries
    (and leaves a live one's alone)."""
    import os
    import subprocess

    child = subprocess.Popen(["true"])  # its pid, once it has exited, is a dead writer's
    child.wait()
    stale = tmp_path / f".edgellm-tmp-{child.pid}-abc.gguf"
    stale.write_bytes(b"x" * 1000)
    live = tmp_path / f".edgellm-tmp-{os.getpid()}-def.gguf"
    live.write_bytes(b"y")
    r = cli("imatrix", str(smollm2_f16), "--chunks", "1", "-c", str(N_CTX), "-o", str(tmp_path / "m.imatrix.gguf"))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "m.imatrix.gguf"])
