"""`edgellm bench` on the real SmolLM2 with tiny sizes, in every output format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

TINY = ["-p", "16", "-n", "8", "-r", "2"]


def test_json_has_llama_bench_fields_for_each_combination(cli, smollm2: Path) -> None:
    r = cli("bench", str(smollm2), *TINY, "--kv-type", "f16,q8_0", "-fa", "1", "-o", "json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["machine"]["cpu_info"] and data["machine"]["ram_bytes"] > 0
    assert data["machine"]["devices"][0]["kind"] == "cpu"
    assert data["build"]["llama_cpp_python"] == "0.3.36"
    results = data["results"]
    assert [(x["test"], x["type_k"], x["type_v"]) for x in results] == [
        ("pp16", "f16", "f16"), ("tg8", "f16", "f16"), ("pp16", "q8_0", "q8_0"), ("tg8", "q8_0", "q8_0"),
    ]
    for x in results:
        assert x["model_type"] == "llama 256M Q4_1"  # llama.cpp's own description
        assert x["model_n_params"] == 134_515_008
        assert x["model_size"] > 90_000_000
        assert x["backends"] == "CPU"
        assert x["flash_attn"] == "on"
        assert len(x["samples_ns"]) == len(x["samples_ts"]) == 2
        assert all(ns > 0 for ns in x["samples_ns"])
        n_tokens = x["n_prompt"] + x["n_gen"]
        assert x["samples_ts"] == pytest.approx([n_tokens * 1e9 / ns for ns in x["samples_ns"]], rel=1e-5)
        assert x["avg_ts"] == pytest.approx(sum(x["samples_ts"]) / 2, rel=1e-5)
        assert x["stddev_ts"] >= 0


def test_table_md_and_csv(cli, smollm2: Path) -> None:
    r = cli("bench", str(smollm2), *TINY, "-t", "1,2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [line for line in lines[1:] if line.strip()]
    assert len(rows) == 4
    assert [row.split()[-4] for row in rows] == ["pp16", "tg8", "pp16", "tg8"]
    assert [float(row.split()[-3]) > 0 for row in rows] == [True] * 4

    md = cli("bench", str(smollm2), *TINY, "-o", "md").stdout.splitlines()
    assert md[0].startswith("| model") and md[1].startswith("| ---")
    assert "| pp16 |" in md[2] and "|  tg8 |" in md[3]

    rows = list(csv.DictReader(io.StringIO(cli("bench", str(smollm2), *TINY, "-o", "csv").stdout)))
    assert [row["test"] for row in rows] == ["pp16", "tg8"]
    assert all(float(row["avg_ts"]) > 0 for row in rows)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-type", "q3_0"], "unknown KV cache type 'q3_0'"),
        (["--kv-type", "q4_0", "-fa", "0"], "a quantized V cache (q4_0) needs flash attention"),
        (["-t", "0"], "threads must be positive, got 0"),
        (["-p", "0", "-n", "0"], "nothing to measure"),
        (["-fa", "maybe"], "unknown flash attention value 'maybe'"),
        (["-r", "0"], "repetitions must be positive"),
    ],
)
def test_bad_combinations_fail_before_anything_runs(cli, smollm2: Path, args: list[str], message: str) -> None:
    r = cli("bench", str(smollm2), *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stdout == ""


def test_sweep_adds_each_quantization_in_the_store(cli, smollm2: Path) -> None:
    for name in ("smol", "smol-q8_0", "smol-notaquant", "other-q8_0"):
        assert cli("import", str(smollm2), "--name", name).returncode == 0
    r = cli("bench", "smol", "--sweep", "-p", "8", "-n", "0", "-r", "1", "-o", "json")
    assert r.returncode == 0, r.stderr
    files = [Path(x["model_filename"]).parent.name for x in json.loads(r.stdout)["results"]]
    assert files == ["smol", "smol-q8_0"]
