"""Checkpoints published quantized (bitsandbytes, GPTQ, AWQ, FP8, compressed-tensors) convert to
the weights they stand for: each dequantized weight against the library's own dequantization or
the values the layout was written from, the converted GGUF's answers against transformers, and
every damaged layout refused in one line with no file left."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellm.convert import convert
from edgellm.convert.checkpoint import Checkpoint
from edgellm.convert.core import planned_header
from edgellm.gguf.header import read_header
from tests import quant_fixtures as qf
from tests.test_convert import PROMPTS, assert_same_answers, gguf_logits, hf_ids, hf_logits

WRITTEN = {
    "gptq-4bit": lambda src, d: qf.gptq_checkpoint(src, d, 4),
    "gptq-4bit-desc-act-asym": lambda src, d: qf.gptq_checkpoint(src, d, 4, desc_act=True, sym=False),
    "gptq-3bit": lambda src, d: qf.gptq_checkpoint(src, d, 3),
    "gptq-3bit-desc-act-v2": lambda src, d: qf.gptq_checkpoint(src, d, 3, desc_act=True, sym=False, v2=True),
    "gptq-2bit-v2": lambda src, d: qf.gptq_checkpoint(src, d, 2, v2=True),
    "gptq-8bit": lambda src, d: qf.gptq_checkpoint(src, d, 8, group=64),
    "awq-gemm": lambda src, d: qf.awq_checkpoint(src, d, "gemm"),
    "awq-gemv": lambda src, d: qf.awq_checkpoint(src, d, "gemv"),
    "fp8-blocks": lambda src, d: qf.fp8_checkpoint(src, d, (64, 64)),
    "fp8-tensor": lambda src, d: qf.fp8_checkpoint(src, d, None),
    "ct-w4a16": lambda src, d: qf.compressed_tensors_checkpoint(src, d, "w4a16"),
    "ct-w4a16-asym": lambda src, d: qf.compressed_tensors_checkpoint(src, d, "w4a16-asym"),
    "ct-w8a8": lambda src, d: qf.compressed_tensors_checkpoint(src, d, "w8a8"),
    "ct-fp8": lambda src, d: qf.compressed_tensors_checkpoint(src, d, "fp8"),
}
LABELS = {
    "gptq-4bit": "GPTQ 4-bit",
    "gptq-3bit": "GPTQ 3-bit",
    "gptq-2bit-v2": "GPTQ 2-bit",
    "gptq-8bit": "GPTQ 8-bit",
    "awq-gemm": "AWQ 4-bit (GEMM)",
    "awq-gemv": "AWQ 4-bit (GEMV)",
    "fp8-blocks": "FP8 (64x64 blocks)",
    "fp8-tensor": "FP8",
    "ct-w4a16": "compressed-tensors W4A16",
    "ct-w8a8": "compressed-tensors INT8",
    "ct-fp8": "compressed-tensors FP8",
}


@pytest.fixture(scope="session")
def written(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    """One checkpoint per written format, made once: (folder, expected weights)."""
    made: dict[str, tuple[Path, dict[str, np.ndarray]]] = {}

    def get(kind: str) -> tuple[Path, dict[str, np.ndarray]]:
        if kind not in made:
            made[kind] = WRITTEN[kind](smollm2_hf, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def bnb(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = qf.bnb_checkpoint(smollm2_hf, tmp_path_factory.mktemp(f"bnb-{kind}"), kind)
        return made[kind]

    return get


@pytest.mark.parametrize("kind", sorted(WRITTEN))
def test_each_written_format_dequantizes_to_exactly_the_weights_it_packs(written, kind: str) -> None:
    folder, expected = written(kind)
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.quantization is not None and ckpt.quantization.layers == len(expected) == 210
        assert ckpt.quantization.label == LABELS.get(kind, ckpt.quantization.label)
        assert not [n for n in ckpt.tensors if n.endswith((".qweight", ".scales", "_packed", "_scale_inv"))]
        for name, want in expected.items():
            got = ckpt.tensors[name].numpy()
            assert got.shape == want.shape and np.array_equal(got, want), name


def _bnb_reference(folder: Path) -> dict[str, np.ndarray]:
    """Every quantized weight as bitsandbytes itself dequantizes the saved tensors."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    saved = load_file(folder / "model.safetensors")
    out = {}
    for name, tensor in saved.items():
        if name.endswith(".SCB"):
            weight = name[: -len(".SCB")] + ".weight"
            out[weight] = F.int8_vectorwise_dequant(saved[weight], tensor).numpy()
        elif ".quant_state.bitsandbytes__" in name:
            weight = name.split(".quant_state.")[0]
            parts = {k[len(weight) + 1 :]: v for k, v in saved.items() if k.startswith(weight + ".")}
            state = F.QuantState.from_dict(parts, device=torch.device("cpu"))
            out[weight] = F.dequantize_4bit(saved[weight], state).float().numpy()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "nf4-dq", "fp4", "int8"])
def test_bitsandbytes_checkpoints_dequantize_as_bitsandbytes_does_and_answer_like_transformers(
    bnb, tmp_path: Path, kind: str
) -> None:
    folder = bnb(kind)
    reference = _bnb_reference(folder)
    assert len(reference) == 210
    with Checkpoint.open(folder) as ckpt:
        for name, want in reference.items():
            got = ckpt.tensors[name].numpy()
            # bitsandbytes computes in the weight's dtype (float32 here): bit for bit the same
            assert np.array_equal(got, want), name
    out = tmp_path / f"{kind}.gguf"
    result = convert(folder, out, "f32")
    assert result.source.startswith("bitsandbytes")
    # transformers runs the quantized checkpoint itself on the CPU, computing in bfloat16 as the
    # checkpoint says (so logits differ by up to ~0.5 of ~30): the same top token for every prompt
    ids = hf_ids(folder, PROMPTS)
    for prompt, h, g in zip(PROMPTS, hf_logits(folder, ids), gguf_logits(out, ids)):
        assert int(h.argmax()) == int(g.argmax()), prompt


def _dequantized_folder(src: Path, expected: dict[str, np.ndarray], dest: Path) -> Path:
    """The original checkpoint with each linear weight replaced by what the quantized one stands
    for: what transformers runs when it loads the quantized checkpoint with the format's kernels."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dest)
    tensors = load_file(src / "model.safetensors")
    tensors.update(expected)
    save_file(tensors, dest / "model.safetensors")
    return dest


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind", ["gptq-4bit-desc-act-asym", "gptq-3bit", "awq-gemm", "fp8-blocks", "ct-w4a16-asym"]
)
def test_converted_quantized_checkpoints_answer_like_transformers(
    written, smollm2_hf: Path, tmp_path: Path, kind: str
) -> None:
    folder, expected = written(kind)
    out = tmp_path / f"{kind}.gguf"
    convert(folder, out, "f32")
    assert_same_answers(_dequantized_folder(smollm2_hf, expected, tmp_path / "reference"), out)


def test_cli_says_what_the_source_was_and_quantize_advises_against_more_bits(cli, written) -> None:
    folder, _ = written("gptq-4bit")
    out = cli.cwd / "gptq.gguf"
    done = cli("convert", str(folder), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "dequantized from GPTQ 4-bit" in done.stdout
    header = read_header(out)
    assert header.metadata["edgellm.source.quantization"] == "GPTQ 4-bit"
    assert header.quantization == "F16"  # auto: a 16-bit intermediate, never the checkpoint's packed ints
    up = cli("quantize", str(out), "Q8_0", "-o", str(cli.cwd / "q8.gguf"))
    assert up.returncode == 0 and "gain nothing over it" in up.stderr, up.stderr
    down = cli("quantize", str(out), "Q4_K_M", "-o", str(cli.cwd / "q4.gguf"))
    assert down.returncode == 0 and "gain nothing" not in down.stderr, down.stderr


def test_a_quantized_checkpoint_is_planned_at_the_size_it_converts_to(written, smollm2_hf: Path) -> None:
    """pull --plan reads only the headers: packed layers must count as the weights they make."""
    folder, _ = written("gptq-4bit")
    with Checkpoint.open(folder) as ckpt:
        raw = {ref.name: ref.shape for f in ckpt.files for ref in f.tensors.values()}
        config = ckpt.config
    with Checkpoint.open(smollm2_hf) as plain:
        shapes = {name: ref.shape for name, ref in plain.tensors.items()}
    for target in ("F16", "Q4_K_M"):
        quantized, original = (
            planned_header(config, raw, target),
            planned_header(plain.config, shapes, target),
        )
        assert quantized.file_size == original.file_size
        assert {t.name: t.shape for t in quantized.tensors} == {t.name: t.shape for t in original.tensors}


# -- hostile layouts ----------------------------------------------------------------------------
def _edit_tensors(folder: Path, edit) -> None:
    """numpy arrays to edit, by way of torch (numpy has no FP8, safetensors.numpy cannot load it)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if v.dtype == torch.float8_e4m3fn}
    arrays = {k: v.numpy() for k, v in tensors.items() if k not in kept}
    edit(arrays)
    save_file(
        {**kept, **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}},
        folder / "model.safetensors",
    )


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


LAYER = "model.layers.3.mlp.down_proj"


def _set(key: str, value):
    return lambda t: t.__setitem__(key, value(t[key]))


def _quant_state(t) -> None:
    key = LAYER + ".weight.quant_state.bitsandbytes__nf4"
    t[key] = np.frombuffer(b'{"quant_type": "nf4", "blocksize": ', np.uint8).copy()


HOSTILE = {
    # (source, how it is damaged, words the one-line error must hold)
    "qweight rows that disagree with bits": (
        "gptq-4bit",
        lambda d: _edit_config(d, lambda q: q.update(bits=8)),
        "cannot hold",
    ),
    "g_idx out of range": (
        "gptq-4bit-desc-act-asym",
        lambda d: _edit_tensors(d, _set(LAYER + ".g_idx", lambda v: v + 1000)),
        "names groups outside",
    ),
    "NaN scales": (
        "gptq-4bit",
        lambda d: _edit_tensors(
            d, _set(LAYER + ".scales", lambda v: np.where(v == v.max(), np.nan, v).astype(v.dtype))
        ),
        "not finite",
    ),
    "inf block scales": (
        "fp8-blocks",
        lambda d: _edit_tensors(d, _set(LAYER + ".weight_scale_inv", lambda v: v * np.inf)),
        "not finite",
    ),
    "AWQ scales of the wrong shape": (
        "awq-gemm",
        lambda d: _edit_tensors(d, _set(LAYER + ".scales", lambda v: v[:-1])),
        "has shape",
    ),
    "a packed weight_shape that lies": (
        "ct-w4a16",
        lambda d: _edit_tensors(d, _set(LAYER + ".weight_shape", lambda v: v * 2)),
        "cannot hold",
    ),
    "an unknown quant_method": (
        "gptq-4bit",
        lambda d: _edit_config(d, lambda q: q.update(quant_method="hqq")),
        "not read by edgellm",
    ),
    "a missing part": ("gptq-4bit", lambda d: _edit_tensors(d, lambda t: t.pop(LAYER + ".qzeros")), "has no"),
}
BNB_HOSTILE = {
    "absmax of the wrong length": (
        lambda d: _edit_tensors(d, _set(LAYER + ".weight.absmax", lambda v: v[:-3])),
        "has shape",
    ),
    "a quant_map of 15 entries": (
        lambda d: _edit_tensors(d, _set(LAYER + ".weight.quant_map", lambda v: v[:15])),
        "has shape",
    ),
    "a malformed quant_state": (lambda d: _edit_tensors(d, _quant_state), "not a bitsandbytes quant state"),
    "NaN absmax": (
        lambda d: _edit_tensors(d, _set(LAYER + ".weight.absmax", lambda v: np.full_like(v, np.nan))),
        "not finite",
    ),
}


def _refused(cli, folder: Path, words: str) -> None:
    out = folder.parent / "out.gguf"
    done = cli("convert", str(folder), "-o", str(out))
    assert done.returncode != 0 and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 2, done.stderr
    assert not out.exists() and not [p for p in folder.parent.iterdir() if p.suffix == ".gguf"]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_damaged_quantized_checkpoints_are_refused_in_one_line(
    cli, written, tmp_path: Path, case: str
) -> None:
    kind, damage, words = HOSTILE[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(written(kind)[0], folder)
    damage(folder)
    _refused(cli, folder, words)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BNB_HOSTILE))
def test_damaged_bitsandbytes_checkpoints_are_refused_in_one_line(
    cli, bnb, tmp_path: Path, case: str
) -> None:
    damage, words = BNB_HOSTILE[case]
    folder = tmp_path / "ckpt"
    shutil.copytree(bnb("nf4"), folder)
    damage(folder)
    _refused(cli, folder, words)


def test_integer_weights_without_a_quantization_config_are_refused(cli, written, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(written("fp8-tensor")[0], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    _refused(cli, folder, "no quantization_config")


# -- the 16-bit base instead ----------------------------------------------------------------------
def test_from_base_converts_the_16bit_checkpoint_instead(cli, written, smollm2_hf: Path) -> None:
    folder, _ = written("gptq-4bit")
    out = cli.cwd / "from-base.gguf"
    done = cli("convert", str(folder), "--from-base", str(smollm2_hf), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"converting {smollm2_hf}, the 16-bit base of gptq-4bit" in done.stdout
    assert "dequantized from" not in done.stdout
    plain = cli.cwd / "plain.gguf"
    assert cli("convert", str(smollm2_hf), "-o", str(plain)).returncode == 0
    ours, theirs = read_header(out), read_header(plain)
    assert [(t.name, t.shape, t.type_name) for t in ours.tensors] == [
        (t.name, t.shape, t.type_name) for t in theirs.tensors
    ]
    assert out.read_bytes()[ours.data_offset :] == plain.read_bytes()[theirs.data_offset :]


def test_from_base_is_refused_where_it_cannot_apply(cli, written, smollm2_hf: Path) -> None:
    folder, _ = written("gptq-4bit")
    unnamed = cli("convert", str(folder), "--from-base", "-o", str(cli.cwd / "x.gguf"))
    assert unnamed.returncode != 0 and "does not name the 16-bit checkpoint" in unnamed.stderr
    plain = cli("convert", str(smollm2_hf), "--from-base", "-o", str(cli.cwd / "x.gguf"))
    assert plain.returncode != 0 and "is not stored quantized" in plain.stderr
    assert not (cli.cwd / "x.gguf").exists()


@pytest.mark.parametrize(
    ("card", "name", "base"),
    [
        (
            "---\nlicense: apache-2.0\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n---\n",
            None,
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        (
            "---\nbase_model:\n- meta-llama/Llama-3.2-1B-Instruct\ntags: [unsloth]\n---\n",
            None,
            "meta-llama/Llama-3.2-1B-Instruct",
        ),
        ("", "unsloth/Qwen3-0.6B-unsloth-bnb-4bit", "unsloth/Qwen3-0.6B"),
        ("", "unsloth/Llama-3.2-1B-bnb-4bit", "unsloth/Llama-3.2-1B"),
        ("no front matter\nbase_model: a/b\n", "someone/model", None),
    ],
)
def test_the_16bit_base_is_read_from_the_card_or_the_name(tmp_path: Path, card: str, name, base) -> None:
    from edgellm.convert.quantized import sixteen_bit_base

    (tmp_path / "README.md").write_text(card)
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": name} if name else {}))
    assert sixteen_bit_base(tmp_path) == base


def test_an_adapter_merges_into_dequantized_weights_but_not_into_packed_ones(
    cli, written, smollm2_adapter: Path
) -> None:
    folder, _ = written("awq-gemm")
    plain, merged = cli.cwd / "plain.gguf", cli.cwd / "merged.gguf"
    assert cli("convert", str(folder), "-o", str(plain)).returncode == 0
    done = cli("convert", str(folder), "--lora", str(smollm2_adapter), "-o", str(merged))
    assert done.returncode == 0, done.stderr
    a, b = read_header(plain), read_header(merged)
    x, y = np.memmap(plain, np.uint8, mode="r"), np.memmap(merged, np.uint8, mode="r")
    changed = [
        t.name
        for t, u in zip(a.tensors, b.tensors)
        if not np.array_equal(x[t.offset : t.offset + t.nbytes], y[u.offset : u.offset + u.nbytes])
    ]
    assert changed and all(".attn_" in n or ".ffn_" in n for n in changed)
    refused = cli("merge", str(folder), str(smollm2_adapter), "-o", str(cli.cwd / "merged-folder"))
    assert refused.returncode != 0 and "stored as AWQ 4-bit (GEMM)" in refused.stderr
    assert not (cli.cwd / "merged-folder").exists()


# -- from the Hub ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_quantized_repo_is_planned_pulled_and_traded_for_its_base(
    cli, written, smollm2_hf: Path, tmp_path: Path
) -> None:
    from tests.hubstandin import HubStandIn

    folder, _ = written("gptq-4bit")
    card = tmp_path / "README.md"
    card.write_text("---\nbase_model: test/SmolLM2-135M-Instruct\nlibrary_name: transformers\n---\n# GPTQ\n")
    hub = HubStandIn()
    try:
        hub.add("test/SmolLM2-GPTQ", {**{p.name: p for p in folder.iterdir()}, "README.md": card})
        hub.add("test/SmolLM2-135M-Instruct", {p.name: p for p in smollm2_hf.iterdir()})
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}

        plans = [
            cli("pull", "--plan", repo, "--quant", "Q4_K_M", env=env)
            for repo in ("test/SmolLM2-GPTQ", "test/SmolLM2-135M-Instruct")
        ]
        assert all(p.returncode == 0 for p in plans), plans[0].stderr
        # the packed checkpoint converts to what the 16-bit one does: the same planned size
        said = [next(line for line in p.stderr.splitlines() if "converts to Q4_K_M" in line) for p in plans]
        assert said[0].split("converts to")[1] == said[1].split("converts to")[1], said

        pulled = cli("pull", "test/SmolLM2-GPTQ", "--quant", "Q4_K_M", env=env, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        assert "dequantized from GPTQ 4-bit" in pulled.stdout
        said = "its model card names the 16-bit base test/SmolLM2-135M-Instruct: `edgellm convert"
        assert said in pulled.stdout
        name = pulled.stdout.splitlines()[0].split()[1]
        answer = cli("run", name, "--temp", "0", "-n", "8", "What is the capital of Germany?", env=env)
        assert answer.returncode == 0 and answer.stdout.strip()

        base = cli("convert", "smollm2-gptq", "--from-base", "--name", "from-base", env=env, timeout=300)
        assert base.returncode == 0, base.stderr
        assert "converting test/SmolLM2-135M-Instruct, the 16-bit base of smollm2-gptq" in base.stdout
        assert "dequantized from" not in base.stdout
    finally:
        hub.close()
