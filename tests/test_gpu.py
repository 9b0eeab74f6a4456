"""On a real ggml GPU device: offload all, part or none of a model, every K/V cache type, the
planner against the buffers llama.cpp logs, `--gpu-memory` respected, and serve, bench and doctor.

These run where this llama.cpp build sees a GPU, whichever backend: CI builds the Vulkan backend
and runs them on Mesa's llvmpipe, a software Vulkan device (`GGML_VK_VISIBLE_DEVICES=0
GGML_VK_DISABLE_F16=1 GGML_VK_DISABLE_COOPMAT=1`, as llama.cpp's own CI does); it is slow (a few
tokens a second), so every answer here is a few tokens long. `bench/gpu_check.sh` runs them on an
NVIDIA GPU with a CUDA build. Elsewhere they are skipped.
"""

from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from edgellm.gguf.header import read_header
from edgellm.options import KV_TYPES
from edgellm.plan.fit import MARGIN, fit, output_offload
from edgellm.plan.memory import ModelShape, estimate
from edgellm.runtime.native import NativeModel
from edgellm.system import llamalog
from edgellm.system.devices import devices
from edgellm.system.hardware import probe

MiB = 2**20
GPUS = [d for d in devices() if d.kind in ("gpu", "igpu")]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPUS, reason="this llama.cpp build sees no GPU device")]


def _loaded(path: Path, ngl: int, **context) -> dict[str, int]:
    position = llamalog.mark()
    with NativeModel(path, ngl) as model, model.context(n_threads=2, **context):
        return llamalog.buffers_by_part(position)


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_planner_within_5_percent_of_every_buffer_on_the_device(which: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(which)
    shape = ModelShape.from_header(read_header(path))
    head = output_offload(probe(), shape, 512)
    failures = []
    for ngl in (0, 1, shape.n_layer // 2, shape.n_layer + 1):  # none, the output only, half, all
        # every token's logits (as perplexity reads them), and one row as the engine reads them
        for ctx, n_outputs in ((1024, 0), (4096, 0), (4096, 1)):
            logged = _loaded(path, ngl, n_ctx=ctx, n_batch=2048, n_ubatch=512, flash_attn="on", swa_full=True,
                             n_outputs=n_outputs)
            planned = estimate(shape, ctx, "f16", "f16", True, ngl, has_gpu=True, output_offload=head,
                               n_outputs=n_outputs).parts()
            for part in sorted(set(logged) | {k for k, v in planned.items() if v}):
                ours, theirs = planned.get(part, 0), logged.get(part, 0)
                # 5%, or 20 KiB for tiny buffers; a compute buffer may be over by two of a batch's
                # embedding-wide tensors (tests/test_plan.py says why)
                over = 2 * 512 * shape.n_embd * 4 if part.startswith("compute") else 0
                if not -0.05 * theirs - 0.02 * MiB <= ours - theirs <= 0.05 * theirs + 0.02 * MiB + over:
                    failures.append(f"ngl {ngl} ctx {ctx} outputs {n_outputs} {part}: planned {ours / MiB:.2f} MiB, "
                                    f"llama.cpp {theirs / MiB:.2f} MiB")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("budget_mib", [300, 340, 400, 1024])
def test_gpu_memory_is_never_exceeded(budget_mib: int, smollm2: Path) -> None:
    budget = budget_mib * MiB
    plan = fit(read_header(smollm2), probe(gpu_memory=budget), n_ctx=4096)
    assert plan.fits
    logged = _loaded(smollm2, plan.n_gpu_layers, n_ctx=plan.n_ctx, n_batch=512, n_ubatch=512,
                     flash_attn="on" if plan.flash_attn else "off", type_k=plan.type_k, type_v=plan.type_v,
                     op_offload=plan.op_offload, n_outputs=1)  # as the engine loads it for one conversation
    on_device = sum(v for k, v in logged.items() if k.endswith(".gpu"))
    assert on_device <= budget - MARGIN, (plan.n_gpu_layers, on_device / MiB)
    assert on_device == pytest.approx(plan.memory.gpu, rel=0.05, abs=0.1 * MiB)


def _chat(cli, *args: str):
    """One short answer from `edgellm chat`, whose first line says how the model was loaded."""
    r = cli("chat", "smollm2-135m-instruct", "-n", "2", "--temperature", "0", *args, input="Hi\n", timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    return r.stderr.splitlines()[0]


@pytest.mark.parametrize("layers, shown", [("all", "· all layers on GPU ·"), ("10", "· 10 GPU layers ·"),
                                            ("auto", "· 31 GPU layers ·"), ("0", "· CPU ·")])
def test_chat_offloads_all_part_or_none(layers: str, shown: str, cli) -> None:
    assert shown in _chat(cli, "--ctx", "512", "--gpu-layers", layers)


@pytest.mark.parametrize("kv", [f"{k},{v}" for k, v in (
    ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "q4_0"), ("q4_1", "q4_1"), ("q5_0", "q5_0"),
    ("q5_1", "q5_1"), ("iq4_nl", "iq4_nl"), ("f32", "f32"))])
def test_every_kv_type_runs_on_the_device(kv: str, cli, smollm2: Path) -> None:
    """Each K/V type runs with flash attention on the device, or, where the device has no kernel for
    it (CUDA has none for iq4_nl), is refused in one line rather than run on the CPU."""
    from edgellm.plan.fit import flash_attn_pairs

    k, v = kv.split(",")
    assert {k, v} <= set(KV_TYPES)
    kernels = flash_attn_pairs(probe(), ModelShape.from_header(read_header(smollm2)))
    if kernels is None or (k, v) in kernels:
        status = _chat(cli, "--ctx", "256", "--gpu-layers", "all", "--kv-type", kv)
        assert f"· kv {k}/{v} · flash-attn on · all layers on GPU ·" in status
    else:
        r = cli("chat", "smollm2-135m-instruct", "-n", "2", "--ctx", "256", "--gpu-layers", "all", "--kv-type", kv,
                input="Hi\n")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        assert f"no flash-attention kernel for a {k}/{v} KV cache on {GPUS[0].name}" in r.stderr


def test_a_kv_pair_without_a_device_kernel_is_refused_or_runs_without_flash_attention(cli, smollm2: Path) -> None:
    """A pair the device has no flash-attention kernel for (on Vulkan, bf16 beside another type)
    would run on the CPU, so asked for, it is refused; with flash attention on auto it is turned
    off, which an f16 V allows."""
    from edgellm.plan.fit import flash_attn_pairs

    kernels = flash_attn_pairs(probe(), ModelShape.from_header(read_header(smollm2)))
    lacking = sorted((k, v) for k in KV_TYPES for v in ("f16",) if kernels is not None and (k, v) not in kernels)
    if not lacking:
        pytest.skip(f"{GPUS[0].name} has a flash-attention kernel for every K/V pair with an f16 V")
    k, v = lacking[0]
    r = cli("run", "smollm2-135m-instruct", "Hi", "-n", "2", "--gpu-layers", "all", "--kv-type", f"{k},{v}",
            "--flash-attn", "on")
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"no flash-attention kernel for a {k}/{v} KV cache on {GPUS[0].name}" in r.stderr
    assert f"· kv {k}/{v} · flash-attn off · all layers on GPU ·" in _chat(cli, "--ctx", "256", "--gpu-layers", "all",
                                                                          "--kv-type", f"{k},{v}")


def test_serve_answers_from_the_device(smollm2: Path, home: Path) -> None:
    from tests.test_server import Server

    server = Server(home, smollm2, "--gpu-layers", "all")
    try:
        body = json.dumps({"model": server.name, "max_tokens": 3, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi"}]}).encode()
        request = urllib.request.Request(server.base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(request, timeout=300))
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["completion_tokens"] <= 3
    finally:
        server.stop()


def test_bench_reports_the_device_backend(cli) -> None:
    r = cli("bench", "smollm2-135m-instruct", "-p", "16", "-n", "2", "-r", "1", "-ngl", "99", "-o", "json", timeout=300)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {row["backends"] for row in data["results"]} == {GPUS[0].backend}


def test_doctor_names_the_device_and_its_kv_pairs(cli) -> None:
    r = cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["build"] == GPUS[0].backend.lower() and data["gpus"][0]["device"] == GPUS[0].name
    pairs = data["flash_attn_kv_pairs"][GPUS[0].name]
    assert "q8_0/q8_0" in pairs
    if GPUS[0].backend == "Vulkan":
        assert "bf16/f16" not in pairs  # Vulkan has no bf16 beside another type
    text = cli("doctor").stdout
    assert re.search(rf"KV on GPU +{GPUS[0].name} runs flash attention for \d+ of 81 K/V pairs", text)


def test_an_importance_matrix_reads_activations_off_the_device(smollm2: Path) -> None:
    """Offloaded, each weight's inputs live in device memory: copied back, they sum as on the CPU."""
    import numpy as np

    from edgellm.imatrix import calibration_text, compute_imatrix

    text = calibration_text()
    on_cpu = compute_imatrix(smollm2, text, n_ctx=128, chunks=2, threads=2)
    on_device = compute_imatrix(smollm2, text, n_ctx=128, chunks=2, threads=2, n_gpu_layers=-1)
    assert sorted(on_device.sums) == sorted(on_cpu.sums)
    for name, sums in on_cpu.sums.items():
        assert on_device.counts[name].tolist() == on_cpu.counts[name].tolist()
        assert np.abs(on_device.sums[name] - sums).max() <= 2e-2 * np.abs(sums).max(), name
