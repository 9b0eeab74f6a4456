"""Hostile HTTP clients against a real `edgellm serve`: the model field as a file path, bodies too
large however sent, requests that would hold the server, browser guards, and error shapes. The
server must answer each with a 4xx OpenAI error, keep answering /health within a second, and keep
its memory."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from edgellm.errors import brief
from tests.test_server import Server


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update(EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "edgellm", "import", str(smollm2), "--name", "smol"], check=True, env=env,
                   capture_output=True)
    server = Server(home, None, "--parallel", "2")
    server.home = home
    # the model loaded and both contexts made by ordinary requests: the memory every case starts from
    assert server.raw("/v1/chat/completions", _chat("smol"))[0] == 200
    assert server.raw("/v1/embeddings", {"model": "smol", "input": "a few words"})[0] == 200
    server.rss_start = server.rss()
    yield server
    server.stop()


def _chat(model: str) -> dict:
    return {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}


def _is_openai_error(status: int, body: object, expected: int) -> None:
    assert status == expected, (status, body)
    assert isinstance(body, dict) and set(body) == {"error"} and body["error"]["message"], body


def test_the_model_field_names_store_models_only(store_server: Server, tmp_path: Path) -> None:
    fifo = tmp_path / "wedge.gguf"
    os.mkfifo(fifo)
    outside = tmp_path / "real.gguf"
    outside.write_bytes((store_server.home / "models" / "smol").joinpath(
        json.loads((store_server.home / "models" / "smol" / "manifest.json").read_text())["file"]).read_bytes())
    answers = {}
    for name in ("/etc/shadow", "/etc/passwd", "/nonexistent/x.gguf", "../../../../etc/passwd", str(fifo),
                 str(outside), "../models/smol", "/proc/self/environ", "smol/../smol", "x" * 200):
        status, body, _ = store_server.raw("/v1/chat/completions", _chat(name))
        _is_openai_error(status, body, 404)
        message = body["error"]["message"]
        assert "starts with" not in message and "GGUF" not in message and "folder" not in message
        answers[name] = message.replace(brief(name), "NAME")
    assert len(set(answers.values())) == 1, answers  # existing and missing paths answer alike
    status, body, _ = store_server.raw("/v1/chat/completions", _chat("y" * 100_000))
    _is_openai_error(status, body, 400)
    status, body, _ = store_server.raw("/v1/chat/completions", _chat("SMOL"))
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    assert store_server.raw("/health")[1] == {"status": "ok"}  # the FIFO wedged nothing


def _raw_http(server: Server, request: bytes, timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    conn.connect()
    conn.sock.sendall(request)
    response = http.client.HTTPResponse(conn.sock)
    response.begin()
    status, raw = response.status, response.read()
    conn.close()
    return status, json.loads(raw)


def test_chunked_bodies_over_the_limit_are_refused(store_server: Server) -> None:
    before = store_server.rss()
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        chunk = b"x" * (1 << 20)
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(12)) + b"0\r\n\r\n"
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        status, answer = _raw_http(store_server, head + body)
        _is_openai_error(status, answer, 413)
    assert store_server.rss() < before * 1.1 + (8 << 20)


def test_requests_that_would_hold_the_server_are_bounded(store_server: Server) -> None:
    status, body, _ = store_server.raw("/v1/embeddings", {"model": "smol", "input": ["word"] * 20_000})
    _is_openai_error(status, body, 400)
    status, body, _ = store_server.raw("/v1/chat/completions", {
        "model": "smol", "max_tokens": 1, "messages": [{"role": "user", "content": "w"}] * 20_000})
    _is_openai_error(status, body, 400)
    # a full allowed embeddings request, while /health and a chat keep being answered
    done = {}
    worker = threading.Thread(target=lambda: done.update(
        embed=store_server.raw("/v1/embeddings", {"model": "smol", "input": ["a few words here"] * 256})[0]))
    worker.start()
    time.sleep(0.3)
    start = time.monotonic()
    assert store_server.raw("/health")[0] == 200 and time.monotonic() - start < 1
    start = time.monotonic()
    assert store_server.raw("/v1/chat/completions", _chat("smol"))[0] == 200
    chat_seconds = time.monotonic() - start
    worker.join()
    assert done["embed"] == 200
    assert chat_seconds < 10


def test_error_shapes_are_openai_bodies(store_server: Server) -> None:
    cases = [
        ("/v1/nothing", None, "GET", 404),
        ("/v1/chat/completions", None, "GET", 405),
        ("/v1/chat/completions", b"{not json", "POST", 400),
        ("/v1/completions", {"model": "smol", "prompt": ""}, "POST", 400),
        ("/v1/embeddings", {"model": "smol", "input": "word " * 3000}, "POST", 400),
        ("/v1/embeddings", {"model": "smol", "input": ""}, "POST", 400),
    ]
    for path, body, method, expected in cases:
        status, answer, _ = store_server.raw(path, body, method=method)
        _is_openai_error(status, answer, expected)


def test_browser_guards(smollm2: Path, tmp_path: Path) -> None:
    server = Server(tmp_path / "home", smollm2, "--api-key", "K", "--cors-origin", "https://good.example")
    try:
        preflight = {"Origin": "https://good.example", "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("OPTIONS", "/v1/chat/completions", headers=preflight)
        answer = conn.getresponse()
        assert answer.status == 200 and answer.getheader("access-control-allow-origin") == "https://good.example"
        conn.close()
        status, body, headers = server.raw("/v1/models", None, {"Origin": "https://good.example"})
        _is_openai_error(status, body, 401)
        assert headers.get("access-control-allow-origin") == "https://good.example"  # the page can read why
        assert server.raw("/v1/models", None, {"Authorization": "Bearer K"})[0] == 200
        for host in ("[::1].evil.com", "[::1]evil", "127.0.0.1.evil.com", "localhost:80:80", "evil.com",
                     "[::1]:x"):
            status, body = _raw_http(server, f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            _is_openai_error(status, body, 403)
        for host in ("127.0.0.1:1234", "[::1]:8080", "localhost"):
            assert _raw_http(server, f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())[0] == 200
    finally:
        server.stop()


def _patched(src: Path, dest: Path, key: bytes, value: bytes) -> None:
    """A copy of a real GGUF with one u32/f32 metadata value overwritten in place."""
    raw = bytearray(src.read_bytes())
    at = raw.index(key) + len(key) + 4  # the value follows the key and its 4-byte type
    raw[at : at + len(value)] = value
    dest.write_bytes(bytes(raw))


def test_a_model_that_would_abort_llama_cpp_cannot_kill_the_server(store_server: Server, smollm2: Path) -> None:
    """Files already in the store (placed by hand, or by an older edgellm): refused on load."""
    import struct

    models = store_server.home / "models"
    for name, key, value in (("zero-layers", b"llama.block_count", struct.pack("<I", 0)),
                             ("nan-eps", b"llama.attention.layer_norm_rms_epsilon", struct.pack("<f", float("nan")))):
        shutil.copytree(models / "smol", models / name)
        gguf = next((models / name).glob("*.gguf"))
        _patched(smollm2, gguf, key, value)
        status, body, _ = store_server.raw("/v1/chat/completions", _chat(name))
        assert status >= 400 and set(body) == {"error"}
        assert "outside 1..512" in body["error"]["message"] or "finite number" in body["error"]["message"]
        assert store_server.proc.poll() is None
        assert store_server.raw("/health")[1] == {"status": "ok"}
    assert store_server.raw("/v1/chat/completions", _chat("smol"))[0] == 200


def test_a_template_that_asks_for_gigabytes_fails_alone(smollm2: Path, tmp_path: Path) -> None:
    """A model whose chat template would allocate 3 GB: each request fails, the server does not,
    and its memory does not grow from one such request to the next."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    bomb = "{% set a = 'x' * 1000000 %}{{ ([a] * 3000)|join|length }}"
    reader = gguf.GGUFReader(str(smollm2), "r")
    path = tmp_path / "bomb.gguf"
    writer = gguf.GGUFWriter(str(path), arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, bomb)}, [])
    server = Server(tmp_path / "home", path)
    try:
        sizes = []
        for _ in range(3):
            status, body, _ = server.raw("/v1/chat/completions", _chat(server.name))
            assert status >= 400 and set(body) == {"error"} and "chat template" in body["error"]["message"], body
            assert server.proc.poll() is None and server.raw("/health")[1] == {"status": "ok"}
            sizes.append(server.rss())
        assert sizes[-1] < sizes[0] * 1.1
    finally:
        server.stop()


def test_after_every_case_the_server_answers_and_kept_its_memory(store_server: Server) -> None:
    """Runs last in this module: every hostile case above went to this same server."""
    start = time.monotonic()
    assert store_server.raw("/health")[1] == {"status": "ok"} and time.monotonic() - start < 1
    assert store_server.rss() < store_server.rss_start * 1.1
    assert store_server.raw("/v1/chat/completions", _chat("smol"))[0] == 200


def test_a_page_elsewhere_is_refused_by_its_origin_not_its_content_type(store_server: Server) -> None:
    """litellm's Ollama providers send JSON with no Content-Type, `curl -d` with a form type: both
    were a 400. A browser always sends Origin on a cross-site POST, so that is what is checked."""
    body = json.dumps(_chat("smol")).encode()
    for kind in (b"", b"Content-Type: application/x-www-form-urlencoded\r\n", b"Content-Type: text/plain\r\n"):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + kind
                + b"Content-Length: %d\r\n\r\n" % len(body))
        status, answer = _raw_http(store_server, head + body)
        assert status == 200 and answer["choices"][0]["message"]["content"] is not None, (kind, answer)
    for origin in ("https://evil.example", "null", "http://localhost.evil.example"):
        status, answer, _ = store_server.raw("/v1/chat/completions", _chat("smol"),
                                             {"Content-Type": "text/plain", "Origin": origin})
        _is_openai_error(status, answer, 403)
        assert "are not allowed" in answer["error"]["message"]
    status, answer, _ = store_server.raw("/api/chat", {"model": "smol", "messages": [], "stream": False},
                                         {"Origin": "http://localhost:3000"})  # a page on this machine
    assert status == 200 and answer["done_reason"] == "load"
