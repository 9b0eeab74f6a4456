"""`edgellm serve` as a real process on a free loopback port, driven by the official openai client
and by raw HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def _read_until(sock: socket.socket, needle: bytes, limit: float = 30) -> bytes:
    sock.settimeout(limit)
    seen = b""
    while needle not in seen:
        piece = sock.recv(4096)
        if not piece:
            break
        seen += piece
    return seen


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, home: Path, model: Path | None, *args: str) -> None:
        """``model`` None: the server serves the store, by each request's ``model`` field."""
        self.name = model.stem if model else None
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
        env.update(EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgellm", "serve", *([str(model)] if model else []), "--port", str(self.port),
             "--ctx", "1024", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stderr.read())
                time.sleep(0.2)
        raise RuntimeError("server did not start")

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.base + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)

    def raw(self, path: str, body: bytes | dict | None = None, headers: dict | None = None, method: str | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.base + path, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read() or b"null"), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null"), dict(err.headers)

    def rss(self) -> int:
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    s = Server(tmp_path_factory.mktemp("home"), smollm2, "--parallel", "4")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path):
    from edgellm.options import LoadOptions
    from edgellm.runtime.loader import load_model

    with load_model(smollm2, LoadOptions(n_ctx=256)) as m:
        yield m


def test_models_and_chat(server: Server, tokenizer, smollm2: Path) -> None:
    from edgellm.runtime.templates import Message

    client = server.client()
    assert [m.id for m in client.models.list().data] == [smollm2.stem]
    reply = client.chat.completions.create(model=smollm2.stem, messages=QUESTION, temperature=0, max_tokens=20)
    text = reply.choices[0].message.content
    assert text == "The capital of Germany is Berlin."
    assert reply.choices[0].finish_reason == "stop"
    prompt = tokenizer.tokenize(tokenizer.render([Message("user", QUESTION[0]["content"])]))
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(tokenizer.tokenize(text, add_special=False))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    short = client.chat.completions.create(model=smollm2.stem, messages=QUESTION, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_streamed_text_equals_the_whole_answer(server: Server) -> None:
    client = server.client()
    kwargs = dict(model=server.name, messages=[{"role": "user", "content": "Tell me a short story."}], temperature=0.9,
                  seed=42, max_tokens=40)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs):
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole and whole
    assert finish in ("stop", "length") and usage.completion_tokens > 0


def test_completions_and_logprobs(server: Server) -> None:
    client = server.client()
    done = client.completions.create(model=server.name, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in done.choices[0].text
    chat = client.chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=5, logprobs=True,
                                          top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 5
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert "".join(e.token for e in entries) == chat.choices[0].message.content


def test_embeddings(server: Server) -> None:
    import math

    client = server.client()
    result = client.embeddings.create(model=server.name, input=["The cat sat on the mat.", "The cat sat on the mat.", "Stocks fell."])
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [576] * 3
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[1], abs=1e-5)
    assert vectors[0] != pytest.approx(vectors[2], abs=1e-3)
    assert result.usage.prompt_tokens > 6


def test_json_schema_is_enforced(server: Server) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    reply = server.client().chat.completions.create(
        model=server.name, temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": "Give the largest city of Germany and its population as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    data = json.loads(reply.choices[0].message.content)
    assert set(data) == {"city", "population"}
    assert isinstance(data["city"], str) and isinstance(data["population"], int)


def test_penalties_change_a_repetitive_answer(server: Server) -> None:
    """presence/frequency penalties reach the sampler: counting on, the penalised answer soon stops
    repeating the comma it has already used."""
    ask = {"model": server.name, "temperature": 0, "max_tokens": 24, "prompt": "1, 2, 3, 4, 5, 6, 7,"}
    client = server.client()
    plain = client.completions.create(**ask).choices[0].text
    penalised = client.completions.create(**ask, presence_penalty=1.5, frequency_penalty=1.5).choices[0].text
    assert plain.startswith(" 8, 9, 10, 11")
    assert plain.count(",") >= penalised.count(",") + 3


def test_concurrent_streams_match_their_lone_answers(server: Server) -> None:
    client = server.client()
    questions = ["What is the capital of Germany?", "What is 2+2?", "Say hello.", "Name a color."]

    def ask(q: str) -> str:
        stream = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": q}], temperature=0,
                                                max_tokens=24, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    alone = [ask(q) for q in questions]
    together: list[str | None] = [None] * 4
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i]))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert "Berlin" in alone[0]


def test_second_turn_reuses_the_prompt_cache(server: Server) -> None:
    first = [{"role": "user", "content": "Remember the word banana."}]
    status, body, _ = server.raw("/v1/chat/completions", {"messages": first, "temperature": 0, "max_tokens": 16})
    assert status == 200
    history = first + [body["choices"][0]["message"], {"role": "user", "content": "What word did I ask you to remember?"}]
    status, body, _ = server.raw("/v1/chat/completions", {"messages": history, "temperature": 0, "max_tokens": 16})
    assert status == 200
    assert body["timings"]["cached_tokens"] > 30
    assert "banana" in body["choices"][0]["message"]["content"].lower()


BAD = [
    (b"{not json", {}, 400, "invalid_request"),
    ({"messages": QUESTION, "temperature": "hot"}, {}, 400, "temperature"),
    ({"messages": []}, {}, 400, "messages"),
    ({"messages": QUESTION, "model": "nosuch"}, {}, 404, "model_not_found"),
    ({"messages": [{"role": "user", "content": "word " * 1500}]}, {}, 400, "does not fit the 1024-token context"),
    ({"messages": QUESTION, "max_tokens": -1}, {}, 400, "max_tokens"),
    ({"messages": QUESTION, "n": 17}, {}, 400, "n:"),
    ({"messages": QUESTION, "top_k": -1}, {}, 400, "top_k"),
    ({"messages": QUESTION, "logit_bias": {"one": 5}}, {}, 400, "logit_bias keys are token ids"),
    ({"messages": QUESTION, "logit_bias": {"99999999": 5}}, {}, 400, "outside the vocabulary of 49152"),
    ({"messages": QUESTION, "logit_bias": {"1": 500}}, {}, 400, "in [-100, 100]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}, {}, 400,
     "read text only; a message has a 'image_url' part"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, {}, 400, "role"),
    ({"messages": QUESTION}, {"Host": "evil.example:8080"}, 403, "host_not_allowed"),
]


@pytest.mark.parametrize(("body", "headers", "status", "needle"), BAD)
def test_bad_requests_get_openai_errors(server: Server, body, headers: dict, status: int, needle: str) -> None:
    got, data, _ = server.raw("/v1/chat/completions", body, headers)
    assert got == status
    assert set(data["error"]) >= {"message", "type", "code"}
    assert needle in json.dumps(data["error"])
    assert "Traceback" not in json.dumps(data)
    assert server.raw("/health")[0] == 200  # still serving


def test_oversized_body_is_refused_before_it_is_read(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 5242880\r\n\r\n" + b"{" * 1000)
        reply = _read_until(sock, b"}}").decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"code":"body_too_large"' in reply


def test_logit_bias_bans_and_forces_tokens(server: Server, tokenizer) -> None:
    client = server.client()
    ask = {"model": server.name, "messages": QUESTION, "temperature": 0, "max_tokens": 16}
    assert "Berlin" in client.chat.completions.create(**ask).choices[0].message.content
    banned = {str(t): -100 for t in tokenizer.tokenize(" Berlin", add_special=False)[:1]}
    banned.update({str(t): -100 for t in tokenizer.tokenize("Berlin", add_special=False)[:1]})
    assert "Berlin" not in client.chat.completions.create(**ask, logit_bias=banned).choices[0].message.content
    forced = tokenizer.tokenize(" banana", add_special=False)[0]
    text = client.completions.create(model=server.name, prompt="Fruit:", max_tokens=4, temperature=0,
                                     logit_bias={str(forced): 100}).choices[0].text
    assert text == " banana" * 4


def test_several_choices(server: Server) -> None:
    """n answers to one chat, streamed or not, and a list of prompts in a completion: a choice each."""
    client = server.client()
    several = client.chat.completions.create(model=server.name, messages=QUESTION, n=3, temperature=0.9, seed=5,
                                             max_tokens=12)
    assert [c.index for c in several.choices] == [0, 1, 2] and all(c.message.content for c in several.choices)
    assert 3 <= several.usage.completion_tokens <= 36
    texts: dict[int, str] = {}
    finished = set()
    for chunk in client.chat.completions.create(model=server.name, messages=QUESTION, n=2, temperature=0, max_tokens=12,
                                                stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and texts[0] == texts[1] and "Berlin" in texts[0]
    prompts = ["The capital of France is", "The capital of Italy is"]
    both = client.completions.create(model=server.name, prompt=prompts, max_tokens=4, temperature=0)
    alone = [client.completions.create(model=server.name, prompt=p, max_tokens=4, temperature=0).choices[0].text
             for p in prompts]
    assert [c.text for c in both.choices] == alone and [c.index for c in both.choices] == [0, 1]
    status, body, _ = server.raw("/v1/completions", {"prompt": ["a"] * 9, "n": 2})
    assert status == 400 and "more than 16 answers" in body["error"]["message"]


def test_model_lookup_and_routes_without_v1(server: Server) -> None:
    status, body, _ = server.raw(f"/v1/models/{server.name}")
    assert status == 200 and body["id"] == server.name and body["object"] == "model"
    status, body, _ = server.raw("/v1/models/nosuch")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body, _ = server.raw("/chat/completions", {"messages": QUESTION, "max_tokens": 4, "temperature": 0})
    assert status == 200 and body["object"] == "chat.completion"
    assert server.raw("/models")[1]["data"][0]["id"] == server.name
    assert server.raw("/v1/health")[:2] == (200, {"status": "ok"})


def test_token_ids_outside_the_vocabulary(server: Server) -> None:
    status, data, _ = server.raw("/v1/completions", {"prompt": [1, 2, 99999999], "max_tokens": 2})
    assert status == 400 and "outside the vocabulary of 49152" in data["error"]["message"]


def test_client_killed_mid_stream_frees_its_slot(server: Server) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story."}], "stream": True,
                       "max_tokens": 900, "temperature": 1}).encode()
    for _ in range(5):  # more than the 4 slots: a leaked slot would block the last request below
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        assert b"data:" in _read_until(sock, b"data:")
        sock.close()
    start = time.monotonic()
    reply = server.client().chat.completions.create(model=server.name, messages=QUESTION, temperature=0, max_tokens=20)
    assert reply.choices[0].message.content == "The capital of Germany is Berlin."
    assert time.monotonic() - start < 20


def _http_chunks(sock: socket.socket) -> list[bytes]:
    """The pieces of a chunked HTTP response as the server wrote them (one per write)."""
    data = _read_until(sock, b"\r\n0\r\n\r\n")
    body = data.split(b"\r\n\r\n", 1)[1]
    pieces = []
    while True:
        size, body = body.split(b"\r\n", 1)
        if int(size, 16) == 0:
            return pieces
        pieces.append(body[: int(size, 16)])
        body = body[int(size, 16) + 2:]


def test_events_made_together_are_written_together(server: Server) -> None:
    # the answer's last token, its finish and [DONE] are made at once: one write, not three
    body = json.dumps({"messages": QUESTION, "stream": True, "max_tokens": 30, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        pieces = _http_chunks(sock)
    events = [e for piece in pieces for e in piece.split(b"\n\n") if e]
    assert b'"finish_reason": "stop"' in pieces[-1] and pieces[-1].endswith(b"data: [DONE]\n\n")
    text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1])
    assert text == "The capital of Germany is Berlin."
    assert len(pieces) < len(events)


def test_auth_and_busy(tmp_path: Path, smollm2: Path) -> None:
    s = Server(tmp_path / "home", smollm2, "--api-key", "sekret", "--parallel", "1", "--max-queue", "1")
    try:
        assert s.raw("/health")[0] == 200
        assert s.raw("/v1/models")[0] == 401
        assert s.raw("/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert s.raw("/v1/models", headers={"Authorization": "Bearer sekret"})[0] == 200
        reply = s.client(api_key="sekret").chat.completions.create(model=s.name, messages=QUESTION, temperature=0, max_tokens=8)
        assert "Berlin" in reply.choices[0].message.content
        long = {"messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 100, "temperature": 1,
                "seed": 1}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(
            s.raw("/v1/chat/completions", long, {"Authorization": "Bearer sekret"})[0])) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join()
        assert 503 in results and 200 in results
    finally:
        s.stop()


@pytest.mark.slow
def test_bounded_load_run(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = server.client()
    client.chat.completions.create(model=server.name, messages=QUESTION, max_tokens=8)  # warm
    before = server.rss()

    def one(i: int) -> str:
        r = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": f"Count to {i % 10}."}],
                                           max_tokens=8, temperature=0.5, seed=i)
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(one, range(200)))
    assert len(reasons) == 200 and set(reasons) <= {"stop", "length"}
    after = server.rss()
    assert after < before * 1.05, (before, after)


def test_the_event_loop_is_woken_for_a_burst_at_the_engine_s_flush() -> None:
    """The engine thread's chunks wait in the mailbox until the engine flushes (as it starts a
    decode), then arrive together in one turn of the loop; an answer's last chunk and an error
    are delivered at once, with whatever waited before them."""
    import asyncio

    from edgellm.runtime.chunks import Chunk
    from edgellm.server.generation import Mailbox

    async def scenario() -> list[list]:
        loop = asyncio.get_running_loop()
        box, queue, seen = Mailbox(loop), asyncio.Queue(), []

        async def settle() -> None:  # let a wake-up from the engine thread arrive, if one was sent
            await asyncio.sleep(0.05)
            seen.append([queue.get_nowait() for _ in range(queue.qsize())])

        def engine(*steps) -> None:
            thread = threading.Thread(target=lambda: [step() for step in steps])
            thread.start()
            thread.join()

        engine(lambda: box.post(queue, Chunk("a")), lambda: box.post(queue, Chunk("b")))
        await settle()
        engine(box.flush)
        await settle()
        engine(box.flush)  # nothing waits: no wake-up, nothing delivered twice
        await settle()
        engine(lambda: box.post(queue, Chunk("c")), lambda: box.post(queue, Chunk("", finish_reason="stop")))
        await settle()
        engine(lambda: box.post(queue, ValueError("worker gone")))
        await settle()
        return seen

    seen = asyncio.run(scenario())
    texts = [[item.text if isinstance(item, Chunk) else str(item) for item in burst] for burst in seen]
    assert texts == [[], ["a", "b"], [], ["c", ""], ["worker gone"]]


def test_aliases_answer_for_the_served_model(tmp_path: Path, smollm2: Path) -> None:
    """Claude Code's background calls ask for its small model by name: --alias NAME=MODEL answers
    them, and *=MODEL answers any name not served; aliases are listed with the models."""
    name = smollm2.stem
    server = Server(tmp_path / "home", smollm2, "--alias", f"claude-haiku={name}", "--alias", f"*={name}")
    try:
        listed = [m.id for m in server.client().models.list()]
        assert listed == [name, "claude-haiku"]
        for asked in ("claude-haiku", "gpt-4o", name):
            status, body, _ = server.raw("/v1/chat/completions", {"model": asked, "messages": QUESTION, "max_tokens": 2})
            assert status == 200 and body["model"] == name, (asked, body)
    finally:
        server.stop()
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "edgellm", "serve", str(smollm2), "--port", "1", "--alias", "x=nosuch"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "EDGELLM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 1 and "'nosuch' is not served here" in done.stderr and done.stderr.count("\n") == 1
    bad = subprocess.run([sys.executable, "-m", "edgellm", "serve", "--alias", "x"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "EDGELLM_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "--alias 'x' is not NAME=MODEL" in bad.stderr
