"""Ollama's model-management routes through a real `edgellm serve` of the store and the real
ollama client: pull from a local stand-in for the Hugging Face Hub by Ollama's ``hf.co/`` names,
copy, delete and create (from a model, a GGUF file or a safetensors folder, quantized)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hubstandin import HubStandIn
from tests.test_server import Server

REPO = "test/SmolLM2-135M-Instruct-GGUF"
HUB_NAME = f"hf.co/{REPO}:Q4_1"
QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
GREEDY = {"temperature": 0, "num_predict": 12}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    hub = HubStandIn()
    hub.add(REPO, {"SmolLM2-135M-Instruct-Q4_1.gguf": smollm2})
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path_factory.mktemp("hf")), "HF_HUB_DISABLE_TELEMETRY": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        s = Server(tmp_path_factory.mktemp("home"), None)
    yield s
    s.stop()
    hub.close()


@pytest.fixture()
def client(server: Server):
    import ollama

    return ollama.Client(host=server.base)


def _names(client) -> set[str]:
    return {m.model for m in client.list().models}


def test_pull_by_hub_name_then_chat_copy_and_delete(client, server: Server, smollm2: Path) -> None:
    import ollama

    progress = list(client.pull(HUB_NAME, stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success", progress
    downloads = [p for p in progress if p.total]
    assert downloads and downloads[-1].completed == downloads[-1].total == smollm2.stat().st_size
    assert downloads[0].digest.startswith("sha256:") and downloads[0].status.startswith("pulling ")
    assert "smollm2-135m-instruct-q4_1" in _names(client)
    reply = client.chat(model=HUB_NAME, messages=QUESTION, options=GREEDY)  # the name it was pulled by
    assert "Berlin" in reply.message.content
    assert client.pull(HUB_NAME).status == "success"  # already there: nothing fetched again

    client.copy("smollm2-135m-instruct-q4_1", "smol-copy:latest")
    assert {"smollm2-135m-instruct-q4_1", "smol-copy"} <= _names(client)
    client.delete("smol-copy")
    assert "smol-copy" not in _names(client)
    assert "Berlin" in client.chat(model=HUB_NAME, messages=QUESTION, options=GREEDY).message.content

    with pytest.raises(ollama.ResponseError) as missing:
        client.delete("smol-copy")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as registry:
        client.pull("llama3.2")
    assert registry.value.status_code == 400 and "hf.co/OWNER/REPO" in registry.value.error
    with pytest.raises(ollama.ResponseError) as clash:
        client.copy("smollm2-135m-instruct-q4_1", "smollm2-135m-instruct-q4_1")
    assert clash.value.status_code == 409


def test_create_quantizes_a_gguf_file_and_converts_a_safetensors_folder(
        client, smollm2_f16: Path, smollm2_hf: Path) -> None:
    import ollama

    lines = list(client.create("smol-q8", from_=str(smollm2_f16), quantize="q8_0", stream=True))
    assert lines[0].status == "parsing GGUF" and lines[-1].status == "success"
    assert any(line.status == "quantizing to Q8_0" and line.total for line in lines), lines
    assert "Berlin" in client.chat(model="smol-q8", messages=QUESTION, options=GREEDY).message.content
    details = client.show("smol-q8").details
    assert details.quantization_level == "Q8_0"

    assert client.create("smol-hf-q8", from_=str(smollm2_hf), quantize="Q8_0").status == "success"
    assert client.show("smol-hf-q8").details.quantization_level == "Q8_0"
    assert client.create("smol-again", from_="smol-q8").status == "success"  # a copy of a model here
    assert {"smol-q8", "smol-hf-q8", "smol-again"} <= _names(client)

    for kwargs, status, words in [
        ({"from_": "no-such-model"}, 404, "no such model"),
        ({"from_": str(smollm2_hf / "config.json")}, 404, "not a GGUF file"),
        ({"files": {"x.gguf": "sha256:" + "0" * 64}}, 400, "files is not taken"),
        ({"from_": "smol-q8", "quantize": "Q9_9"}, 400, "Q9_9"),
    ]:
        with pytest.raises(ollama.ResponseError) as refused:
            client.create("smol-bad", **kwargs)
        assert refused.value.status_code == status and words in refused.value.error, refused.value
    with pytest.raises(ollama.ResponseError) as bad_name:
        client.create("Bad/Name", from_="smol-q8")
    assert bad_name.value.status_code == 400
    assert "smol-bad" not in _names(client)


def test_management_routes_refuse_pages_from_elsewhere(server: Server) -> None:
    """A web page from another origin cannot pull, delete, copy or create (a browser sends its
    Origin; the server refuses it before reading the body)."""
    evil = {"Origin": "http://evil.example"}
    for method, path, body in [("POST", "/api/pull", {"model": HUB_NAME}),
                               ("DELETE", "/api/delete", {"model": "x"}),
                               ("POST", "/api/copy", {"source": "a", "destination": "b"}),
                               ("POST", "/api/create", {"model": "x", "from": "/etc"})]:
        status, _, _ = server.raw(path, body, evil, method=method)
        assert status == 403, (path, status)
