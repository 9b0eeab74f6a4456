"""`edgellm pull` against a local stand-in for the Hugging Face Hub (HF_ENDPOINT points at it)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI, tree
from tests.hubstandin import HubStandIn

REPO = "test/SmolLM2-135M-Instruct-GGUF"
FILE = "SmolLM2-135M-Instruct-Q4_1.gguf"


@pytest.fixture(scope="session")
def split_parts(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """SmolLM2 rewritten as two llama.cpp split files by gguf-py's own writer."""
    import gguf
    import numpy as np

    out = tmp_path_factory.mktemp("split")
    reader = gguf.GGUFReader(smollm2)
    writer = gguf.GGUFWriter(out / "smol-Q4_1", "llama", split_max_tensors=-(-len(reader.tensors) // 2))
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, f.contents(), f.types[0], sub_type=f.types[-1])
        else:
            writer.add_key_value(key, f.contents(), f.types[0])
    for t in reader.tensors:
        data = np.asarray(t.data)
        writer.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return sorted(out.glob("*-of-*.gguf"))


CHECKPOINT_REPO = "test/SmolLM2-135M-Instruct"


@pytest.fixture()
def hub(smollm2: Path, split_parts: list[Path], smollm2_hf: Path, smollm2_adapter: Path):
    stand_in = HubStandIn()
    checkpoint = {p.name: p for p in smollm2_hf.iterdir()}
    # a pickle beside the safetensors, as many repos ship: it must never be downloaded
    stand_in.add(CHECKPOINT_REPO, {**checkpoint, "pytorch_model.bin": smollm2_hf / "config.json"})
    stand_in.add("test/cats-adapter", {p.name: p for p in smollm2_adapter.iterdir()})
    stand_in.add("test/pickle-only", {"config.json": smollm2_hf / "config.json", "pytorch_model.bin": smollm2_hf / "config.json"})
    stand_in.add("test/split-GGUF", {p.name: p for p in split_parts})
    stand_in.add(REPO, {FILE: smollm2, "README.md": smollm2.parent / "__init__.py"})
    stand_in.add("test/two-quants-GGUF", {"m-Q4_1.gguf": smollm2, "m-Q4_K_M.gguf": smollm2, "m-Q8_0.gguf": smollm2})
    stand_in.add("test/gated-GGUF", {FILE: smollm2}, gated=True)
    stand_in.add("test/hostile-GGUF", {FILE: smollm2}, listed_names=["../../escape-Q4_1.gguf", "/etc/abs-Q8_0.gguf", FILE])
    yield stand_in
    stand_in.close()


@pytest.fixture()
def pull_cli(cli: CLI, hub: HubStandIn, tmp_path: Path):
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def run(*args: str, extra: dict | None = None):
        return cli(*args, env={**env, **(extra or {})})

    return run


def test_pull_by_quant_verifies_and_registers(pull_cli, home: Path, smollm2: Path) -> None:
    r = pull_cli("pull", f"{REPO}:q4_1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pulled smollm2-135m-instruct-q4_1 (93.8 MiB, Q4_1)"
    assert "Q4_1: 93.8 MiB in 1 file(s); fits: ctx 4096" in r.stderr
    manifest = json.loads((home / "models" / "smollm2-135m-instruct-q4_1" / "manifest.json").read_text())
    assert manifest["sha256"] == hashlib.sha256(smollm2.read_bytes()).hexdigest()
    assert manifest["source"].startswith(f"hf:{REPO}@")
    answer = pull_cli("run", "smollm2-135m-instruct-q4_1", "What is the capital of Germany?", "-n", "12", "--temperature", "0")
    assert "Berlin" in answer.stdout
    again = pull_cli("pull", f"{REPO}:Q4_1")  # already there: nothing downloaded again
    assert again.returncode == 0


def test_removing_a_pulled_model_frees_its_hub_cache_copy(pull_cli, tmp_path: Path, split_parts: list[Path]) -> None:
    """A pull hard-links the Hub cache's file into the store; removing the model removes both, so
    its bytes are really freed. Another repo's files in the cache stay."""
    assert pull_cli("pull", "test/split-GGUF:Q4_1").returncode == 0
    assert pull_cli("pull", f"{REPO}:q4_1").returncode == 0
    cache = tmp_path / "hf" / "hub"
    blobs = lambda repo: list((cache / f"models--{repo.replace('/', '--')}" / "blobs").iterdir())  # noqa: E731
    assert len(blobs("test/split-GGUF")) == len(split_parts)
    r = pull_cli("rm", "split-q4_1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "removed split-q4_1 and its copy in the Hugging Face cache"
    assert blobs("test/split-GGUF") == []
    assert not [p for p in (cache / "models--test--split-GGUF" / "snapshots").rglob("*") if p.is_symlink()]
    assert len(blobs(REPO)) == 1  # the other pull's copy is untouched
    assert pull_cli("rm", "smollm2-135m-instruct-q4_1").stdout.strip().endswith("Hugging Face cache")


def test_split_model_is_fetched_as_a_set(pull_cli, home: Path, split_parts: list[Path]) -> None:
    r = pull_cli("pull", "test/split-GGUF:Q4_1")
    assert r.returncode == 0, r.stderr
    assert "Q4_1: 93.8 MiB in 2 file(s)" in r.stderr
    folder = home / "models" / "split-q4_1"
    assert sorted(p.name for p in folder.glob("*.gguf")) == [p.name for p in split_parts]
    assert json.loads((folder / "manifest.json").read_text())["size"] == sum(p.stat().st_size for p in split_parts)
    answer = pull_cli("run", "split-q4_1", "What is the capital of Germany?", "-n", "12", "--temperature", "0")
    assert "Berlin" in answer.stdout, answer.stderr


def test_default_quant_is_q4_k_m_when_present(pull_cli) -> None:
    r = pull_cli("pull", "test/two-quants-GGUF")
    assert r.returncode == 0, r.stderr
    assert "no quantization given: picked Q4_K_M" in r.stderr
    assert r.stdout.startswith("pulled two-quants-q4_k_m")


def test_plan_reads_only_the_header(pull_cli, hub: HubStandIn, tmp_path: Path, home: Path) -> None:
    r = pull_cli("pull", f"{REPO}:Q4_1", "--plan")
    assert r.returncode == 0, r.stderr
    assert "fits: ctx 4096 · kv f16/f16 · CPU only" in r.stderr
    assert tree(home / "models") == {}
    assert not any(p.is_file() and p.stat().st_size > 10_000_000 for p in (tmp_path / "hf").rglob("*"))
    too_small = pull_cli("pull", f"{REPO}:Q4_1", "--plan", extra={"EDGELLM_RAM": "300MiB"})
    assert too_small.returncode == 1 and "does not fit" in too_small.stderr


def test_interrupted_download_resumes(pull_cli, hub: HubStandIn, home: Path, smollm2: Path) -> None:
    hub.drop_after[FILE] = 30 << 20  # the connection drops once, 30 MiB in
    first = pull_cli("pull", f"{REPO}:Q4_1")
    if first.returncode != 0:  # huggingface_hub gave up: a second pull continues the partial file
        assert len(first.stderr.strip().splitlines()[-1]) < 400
        assert tree(home / "models") == {}
        second = pull_cli("pull", f"{REPO}:Q4_1")
        assert second.returncode == 0, second.stderr
    entry = home / "models" / "smollm2-135m-instruct-q4_1" / FILE
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == hashlib.sha256(smollm2.read_bytes()).hexdigest()


ERRORS = [
    (["pull", "test/nothing-here"], {}, "error: repo test/nothing-here not found on the Hub"),
    (["pull", "test/gated-GGUF"], {}, "is gated: accept its terms on the Hub and give a token (export HF_TOKEN="),
    (["pull", f"{REPO}:Q8_0"], {}, f"error: {REPO} has no Q8_0 file (available: Q4_1 (93 MiB))"),
    (["pull", "../etc/passwd"], {}, "error: invalid repo id '../etc/passwd'"),
    (["pull", "a/b/c"], {}, "error: invalid repo id 'a/b/c'"),
    (["pull", REPO], {"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub (http://127.0.0.1:9): offline?"),
]


@pytest.mark.parametrize(("args", "env", "message"), ERRORS)
def test_errors_are_one_line_and_change_nothing(pull_cli, home: Path, args: list[str], env: dict, message: str) -> None:
    before = tree(home)
    r = pull_cli(*args, extra=env)
    assert r.returncode in (1, 2)
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree(home) == before


def test_hostile_listing_never_writes_outside_the_store(pull_cli, home: Path, tmp_path: Path) -> None:
    r = pull_cli("pull", "test/hostile-GGUF")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("pulled hostile-q4_1")
    assert not (tmp_path / "escape-Q4_1.gguf").exists() and not Path("/etc/abs-Q8_0.gguf").exists()
    assert [p.name for p in (home / "models").iterdir() if not p.name.startswith(".")] == ["hostile-q4_1"]


def test_two_pulls_at_once(hub: HubStandIn, home: Path, tmp_path: Path) -> None:
    import os

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update(EDGELLM_HOME=str(home), HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-m", "edgellm", "pull", f"{REPO}:Q4_1"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [p.name for p in (home / "models").iterdir() if not p.name.startswith(".")] == ["smollm2-135m-instruct-q4_1"]


def test_not_enough_disk(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgellm.errors import EdgeLLMError
    from edgellm.models.hub import pull
    from edgellm.models.store import Store

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(EdgeLLMError, match="not enough disk space for 93 MiB"):
        pull(f"{REPO}:Q4_1", Store(tmp_path / "models"))
    assert [r for r in hub.requests if "/resolve/" in r] == []  # refused before any download
    assert not (tmp_path / "models" / "smollm2-135m-instruct-q4_1").exists()


@pytest.mark.slow
def test_pull_a_safetensors_repo_converts_and_quantizes(pull_cli, hub: HubStandIn, home: Path) -> None:
    r = pull_cli("pull", CHECKPOINT_REPO, "--quant", "q4_k_m")
    assert r.returncode == 0, r.stderr
    assert "has no GGUF files: its safetensors checkpoint (516.5 MiB) converts to Q4_K_M; fits: " in r.stderr
    assert r.stdout.startswith("pulled smollm2-135m-instruct-q4_k_m (")
    assert not any("pytorch_model.bin" in line for line in hub.requests if line.startswith("GET /test"))
    assert sorted(p.name for p in (home / "models").iterdir()) == ["smollm2-135m-instruct-q4_k_m"]
    answer = pull_cli("run", "smollm2-135m-instruct-q4_k_m", "--temp", "0", "-n", "8", "What is the capital of Germany?")
    assert "Berlin" in answer.stdout
    # the checkpoint stays, by name, for `edgellm convert`
    again = pull_cli("convert", "smollm2-135m-instruct", "--outtype", "q8_0")
    assert again.returncode == 0 and again.stdout.startswith("smollm2-135m-instruct-q8_0: llama, 272 tensors, Q8_0")


@pytest.mark.slow
def test_pull_a_safetensors_repo_with_a_lora_adapter_repo(pull_cli, hub: HubStandIn, home: Path) -> None:
    r = pull_cli("pull", CHECKPOINT_REPO, "--lora", "test/cats-adapter")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((home / "models" / "smollm2-135m-instruct-cats-adapter-f16" / "manifest.json").read_text())
    assert "+lora:" in manifest["source"] and manifest["quantization"] == "F16"


def test_pickle_only_repo_is_refused(pull_cli, hub: HubStandIn, home: Path) -> None:
    r = pull_cli("pull", "test/pickle-only")
    assert r.returncode == 1
    assert "test/pickle-only has no GGUF files, nor safetensors weights to convert" in r.stderr
    assert tree(home / "models") == {}


def test_search_lists_gguf_repos_by_downloads(pull_cli, hub: HubStandIn) -> None:
    r = pull_cli("search", "smollm2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["REPO", "DOWNLOADS", "LIKES"]
    assert [line.split()[0] for line in lines[1:]] == [REPO]  # the safetensors repo is not a GGUF repo
    none = pull_cli("search", "no-such-model")
    assert none.returncode == 1 and "no GGUF repos match 'no-such-model'" in none.stderr


def test_plan_of_a_safetensors_repo_reads_only_headers(pull_cli, hub: HubStandIn, home: Path, tmp_path: Path) -> None:
    r = pull_cli("pull", "--plan", CHECKPOINT_REPO, "--quant", "Q4_K_M")
    assert r.returncode == 0, r.stderr
    assert "converts to Q4_K_M; fits: ctx 4096" in r.stderr
    assert tree(home / "models") == {} and not list((tmp_path / "hf").rglob("*.safetensors"))
    small = pull_cli("pull", "--plan", CHECKPOINT_REPO, extra={"EDGELLM_RAM": "64MiB"})
    assert small.returncode == 1 and "converts to f16/bf16; does not fit" in small.stderr
