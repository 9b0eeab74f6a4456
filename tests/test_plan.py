"""The memory planner against llama.cpp's own buffer sizes, auto-fit against a hand calculation,
and doctor on this machine (no GPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgellm.gguf.header import read_header
from edgellm.plan.memory import ModelShape, estimate
from edgellm.runtime.native import NativeModel
from edgellm.system import llamalog

MiB = 2**20


def _sizes(lines: list[str], what: str) -> float:
    return sum(float(m.group(1)) for line in lines if what in line for m in [re.search(r"= +([0-9.]+) MiB", line)] if m)


CASES = [  # ctx, K, V, flash attention, micro-batch, swa_full, sequences, logits rows (0: the micro-batch)
    (512, "f16", "f16", "on", 512, False, 1, 0),
    (4096, "f16", "f16", "on", 512, False, 1, 0),
    (4096, "q8_0", "q8_0", "on", 512, False, 1, 0),
    (4096, "q4_0", "q4_0", "on", 512, True, 1, 0),
    (1000, "f16", "f16", "on", 128, False, 1, 0),
    (8192, "f16", "f16", "off", 512, True, 1, 0),
    (2048, "f16", "f16", "off", 512, True, 1, 0),
    # as the engine makes them: a logits row a sequence, the cache shared among the sequences
    (4096, "f16", "f16", "on", 512, True, 1, 1),
    (4096, "q8_0", "q8_0", "on", 512, True, 1, 1),
    (8192, "f16", "f16", "on", 512, True, 4, 4),
    (2048, "f16", "f16", "off", 512, True, 2, 2),
    (4096, "q4_0", "q4_0", "on", 256, True, 8, 8),
]


@pytest.fixture(scope="module")
def qwen3moe(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixture of experts (8 layers of 8 experts, two per token), converted to F16 by edgellm."""
    from edgellm.convert import convert
    from tests.hf_fixtures import tiny_moe

    root = tmp_path_factory.mktemp("moe")
    folder = tiny_moe(root / "moe", smollm2_hf, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=8,
                      num_experts=8, head_dim=64)
    return convert(folder, root / "moe-f16.gguf", "f16").path


@pytest.fixture(scope="module")
def gptoss(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt-oss's shape where memory is concerned: more query heads than the embedding is wide (32
    of 64 over 256, as the real one's 64 of 64 over 2880), sliding-window layers every other layer
    and attention sinks; four experts. In F16."""
    from edgellm.convert import convert
    from tests.hf_fixtures import tiny_model

    root = tmp_path_factory.mktemp("gptoss")
    folder = tiny_model(root / "ckpt", smollm2_hf, "gpt_oss", vocab_size=49152, hidden_size=256, intermediate_size=64,
                        num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=2, head_dim=64,
                        num_local_experts=4, num_experts_per_tok=2, sliding_window=128,
                        max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return convert(folder, root / "gptoss-f16.gguf", "f16").path


@pytest.mark.parametrize("which", ["smollm2", "gemma3", "qwen3moe", "gptoss"])
def test_estimates_within_5_percent_of_llama_cpp(which: str, request: pytest.FixtureRequest) -> None:
    """Each buffer within 5%; a compute buffer may be over by two of a batch's embedding-wide tensors:
    what else is alive beside a layer's peak, and where llama.cpp's allocator fits it, varies with
    the cache types and the micro-batch (the plan takes the most it saw)."""
    path = request.getfixturevalue(which)
    shape = ModelShape.from_header(read_header(path))
    position = llamalog.mark()
    failures = []
    with NativeModel(path) as model:
        model_mib = _sizes(llamalog.since(position), "model buffer size")
        for case in CASES:
            ctx, k, v, fa, ub, swa_full, n_seq, n_outputs = case
            position = llamalog.mark()
            with model.context(n_ctx=ctx, n_batch=2048, n_ubatch=ub, n_threads=2, type_k=k, type_v=v,
                               flash_attn=fa, swa_full=swa_full, n_seq_max=n_seq, n_outputs=n_outputs):
                logged = llamalog.since(position)
            est = estimate(shape, ctx, k, v, fa == "on", 0, n_ubatch=ub, swa_full=swa_full, n_seq=n_seq,
                           n_outputs=n_outputs)
            embeddings = 2 * ub * shape.n_embd * 4 / MiB
            for name, ours, theirs, over in (
                ("weights", est.weights.cpu / MiB, model_mib, 0),
                ("KV cache", est.kv.cpu / MiB, _sizes(logged, "KV buffer size"), 0),
                ("compute", est.compute.cpu / MiB, _sizes(logged, "compute buffer size"), embeddings),
                ("logits", est.output / MiB, _sizes(logged, "output buffer size"), 0),
            ):
                assert theirs > 0
                if not 0.95 * theirs <= ours <= 1.05 * theirs + over:
                    failures.append(f"{case} {name}: planned {ours:.2f} MiB, llama.cpp {theirs:.2f} MiB")
    assert not failures, "\n".join(failures)


def test_another_quantization_is_planned_from_one_header(smollm2: Path, smollm2_f16: Path) -> None:
    """A Hub repo's quantizations are planned from one header: the F16's shape with the Q4_1's
    weights needs what the Q4_1's own header says, within 2% (KV and compute are the model's)."""
    from edgellm.plan.fit import fit
    from edgellm.system.hardware import probe

    q4 = ModelShape.from_header(read_header(smollm2))
    f16 = ModelShape.from_header(read_header(smollm2_f16))
    assert f16.weight_bytes > 2.5 * q4.weight_bytes
    hw = probe()
    own, planned = fit(q4, hw, n_ctx=4096), fit(f16.resized(q4.weight_bytes), hw, n_ctx=4096)
    assert planned.memory.cpu == pytest.approx(own.memory.cpu, rel=0.02)
    assert planned.memory.kv == own.memory.kv


def test_kv_cache_shrinks_as_the_types_say(smollm2: Path) -> None:
    kv = {}
    with NativeModel(smollm2) as model:
        for t in ("f16", "q8_0", "q4_0"):
            position = llamalog.mark()
            with model.context(n_ctx=4096, type_k=t, type_v=t, flash_attn="on"):
                kv[t] = _sizes(llamalog.since(position), "KV buffer size")
    assert kv["f16"] == 90.0  # 4096 cells x 30 layers x 3 KV heads x 64 x (K + V) x 2 bytes
    assert kv["f16"] / kv["q8_0"] == pytest.approx(1.88, abs=0.02)  # 34 bytes per 32 values
    assert kv["f16"] / kv["q4_0"] == pytest.approx(3.56, abs=0.02)  # 18 bytes per 32 values


def _plan(cli, model: str, *args: str) -> dict:
    r = cli("plan", model, "--json", *args)
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


def test_auto_fit_offloads_the_layers_a_hand_calculation_gives(cli, smollm2: Path) -> None:
    """Layers count as llama.cpp counts them: the output layer first (SmolLM2 ties its head to the
    token embeddings, so llama.cpp copies those to the GPU), then repeating layers from the last."""
    header = read_header(smollm2)
    layer = sum(t.nbytes for t in header.tensors if t.name.startswith("blk.0."))
    assert all(sum(t.nbytes for t in header.tensors if t.name.startswith(f"blk.{i}.")) == layer for i in range(30))
    head = sum(t.nbytes for t in header.tensors if t.name in ("token_embd.weight", "output_norm.weight"))
    kv_layer = 4096 * 3 * 64 * 2 * 2  # cells x KV heads x head size x (K and V) x f16
    # the GPU's compute buffer for a batch of 512 tokens: a layer's feed-forward activations and three
    # embedding-wide tensors, the f16 mask over the cache, and a host layer's feed-forward weights
    # copied over (its logits are one row, as the engine reads them)
    compute = 512 * 4 * (3 * 1536 + 3 * 576) + 4096 * 512 * 2 + layer * 2 // 3
    margin = 256 * MiB
    for want in (1, 2, 11, 30):
        budget = margin + compute + head + (want - 1) * (layer + kv_layer) + (layer + kv_layer) // 2
        plan = _plan(cli, str(smollm2), "--gpu-memory", str(budget))
        assert plan["fits"] and plan["n_gpu_layers"] == want, (want, plan["n_gpu_layers"])
        assert plan["vram"] <= budget - margin
    # too small even for the compute buffer llama.cpp would reserve there: the GPU is left out
    none = _plan(cli, str(smollm2), "--gpu-memory", str(margin + 16 * MiB))
    assert none["fits"] and none["n_gpu_layers"] == 0 and none["vram"] == 0 and none["op_offload"] is False
    everything = _plan(cli, str(smollm2), "--gpu-memory", "2GiB")
    assert everything["n_gpu_layers"] == 31  # every layer and the output
    assert everything["kv_cache"]["cpu"] == 0 and everything["op_offload"] is True


def test_kv_auto_steps_down_only_when_the_context_needs_it(cli, smollm2: Path) -> None:
    roomy = _plan(cli, str(smollm2), "--kv-type", "auto", "--ram", "4GiB")
    assert (roomy["type_k"], roomy["type_v"]) == ("f16", "f16")
    # 170 MiB after the margin: f16 (200.9 MiB) does not fit at 4096, f16/q8_0 (179.8) neither,
    # q8_0/q8_0 (158.7) does
    tight = _plan(cli, str(smollm2), "--kv-type", "auto", "--ram", "426MiB")
    assert tight["fits"] and (tight["type_k"], tight["type_v"]) == ("q8_0", "q8_0")
    assert tight["flash_attn"] is True


def test_ctx_auto_takes_the_longest_context_that_fits(cli, smollm2: Path) -> None:
    assert _plan(cli, str(smollm2), "--ctx", "auto")["n_ctx"] == 8192  # the trained length
    # 250 MiB after the margin: weights 92.1, compute 14.6 and a mask's 1 KiB a cell, logits 0.2
    # leave room for ~6200 cells of 22.5 KiB
    limited = _plan(cli, str(smollm2), "--ctx", "auto", "--ram", "506MiB")
    assert limited["fits"] and limited["n_ctx"] == 6144
    assert limited["ram"] <= 250 * MiB


def test_plans_that_cannot_fit_say_so(cli, smollm2: Path) -> None:
    plan = _plan(cli, str(smollm2), "--ram", "426MiB")
    assert not plan["fits"]
    assert "nearest plan that fits: --ctx 4096 --kv-type q8_0,q8_0" in plan["reason"]
    r = cli("run", str(smollm2), "hi", "--ram", "300MiB")
    assert r.returncode == 1
    assert len(r.stderr.strip().splitlines()) == 1
    assert "does not fit: needs 201 MiB of RAM" in r.stderr
    assert "even the smallest context does not fit" in r.stderr


def test_chat_uses_the_plan(cli) -> None:
    r = cli("chat", "--ctx", "auto", "--kv-type", "auto", "-n", "4", input="Hi\n")
    assert r.returncode == 0, r.stderr
    assert "ctx 8192 · kv f16/f16" in r.stderr and "· CPU ·" in r.stderr


def test_doctor_on_a_machine_without_gpu(cli) -> None:
    r = cli("doctor")
    assert r.returncode == 0
    assert "GPU          none usable: CPU only" in r.stdout
    assert "no GPU found" in r.stdout
    data = json.loads(cli("doctor", "--json").stdout)
    assert data["cpu_only"] is True and data["gpus"] == []
    assert data["ram_total"] > data["ram_available"] > 0


def test_layer_split_follows_llama_cpp() -> None:
    from edgellm.plan.fit import layer_split

    two = [("RPC0[a:1]", 8 << 30), ("RPC1[b:2]", 8 << 30)]
    assert layer_split(30, 20, two) == [("CPU", 11), ("RPC0[a:1]", 10), ("RPC1[b:2]", 10)]
    assert layer_split(30, -1, two, (3.0, 1.0)) == [("CPU", 0), ("RPC0[a:1]", 24), ("RPC1[b:2]", 7)]
    assert layer_split(30, 0, two) == [("CPU", 31), ("RPC0[a:1]", 0), ("RPC1[b:2]", 0)]
    # by free memory when no shares are given
    assert layer_split(30, -1, [("A", 6 << 30), ("B", 2 << 30)]) == [("CPU", 0), ("A", 24), ("B", 7)]


def test_rpc_and_tensor_split_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgellm.config import Settings
    from edgellm.errors import EdgeLLMError

    s = Settings.resolve({"rpc": "127.0.0.1:50052, 10.0.0.2:50053", "tensor_split": "3,1"})
    assert s.load.rpc == ("127.0.0.1:50052", "10.0.0.2:50053") and s.load.tensor_split == (3.0, 1.0)
    with pytest.raises(EdgeLLMError, match="--rpc takes HOST:PORT"):
        Settings.resolve({"rpc": "localhost"})
    with pytest.raises(EdgeLLMError, match="invalid value 'a,b' for tensor_split"):
        Settings.resolve({"tensor_split": "a,b"})
