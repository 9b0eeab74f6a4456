"""Two real RPC workers on loopback ports: layers split over the local CPU and both of them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROMPT = "What is the capital of Germany?"
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    from edgellm.errors import EdgeLLMError
    from edgellm.system.rpc import hello

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGELLM_HOME": str(tmp_path / "worker-home")}
    log = tmp_path / f"worker-{port}.log"  # a file, not a pipe: a full pipe would stall the worker
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "edgellm", "worker", "--port", str(port), "-t", "1"],
                                stdout=subprocess.DEVNULL, stderr=sink, env=env)
    endpoint = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            hello(endpoint, timeout=1)
            return proc, endpoint
        except EdgeLLMError:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.2)


@pytest.fixture()
def workers(tmp_path: Path):
    started = [start_worker(tmp_path) for _ in range(2)]
    yield [endpoint for _, endpoint in started]
    for proc, _ in started:
        proc.kill()
        proc.wait()


def _layers(stderr: str) -> tuple[dict[str, int], dict[str, int]]:
    """Layers per device as planned, and as llama.cpp logged placing them."""
    planned, placed = re.search(r"layers per device: (.+) \(llama.cpp placed: (.*)\)", stderr).groups()
    return tuple(dict((d, int(n)) for d, n in (part.rsplit(" ", 1) for part in text.split(" · ")))
                 for text in (planned, placed))


@pytest.mark.slow
def test_split_over_two_workers_answers_like_one_process(cli, workers: list[str]) -> None:
    args = ["run", MODEL, "--temp", "0", "--seed", "7", "-n", "24", PROMPT]
    alone = cli(*args)
    assert alone.returncode == 0 and "Berlin" in alone.stdout
    split = cli(*args, "--rpc", ",".join(workers), "--gpu-layers", "20", "--tensor-split", "1,1")
    assert split.returncode == 0, split.stderr[-2000:]
    assert split.stdout == alone.stdout
    planned, placed = _layers(split.stderr)
    assert planned == {"CPU": 11, f"RPC0@{workers[0]}": 10, f"RPC1@{workers[1]}": 10}
    assert placed == {"CPU": 11, "RPC0": 10, "RPC1": 10}  # the planner's split is the one llama.cpp made


@pytest.mark.slow
def test_default_split_follows_the_workers_free_memory(cli, workers: list[str]) -> None:
    done = cli("run", MODEL, "--temp", "0", "-n", "4", PROMPT, "--rpc", workers[0], "--gpu-layers", "all")
    assert done.returncode == 0, done.stderr[-2000:]
    assert _layers(done.stderr) == ({"CPU": 0, f"RPC0@{workers[0]}": 31}, {"RPC0": 31})


def test_unreachable_worker_and_wrong_port_are_clear_errors(cli, tmp_path: Path) -> None:
    closed = f"127.0.0.1:{free_port()}"
    done = cli("run", MODEL, "-n", "2", PROMPT, "--rpc", closed)
    assert done.returncode == 1 and f"worker {closed} is unreachable" in done.stderr
    assert done.stderr.count("\n") == 1
    # something that is not an RPC worker: an HTTP server
    http = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port := free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        start = time.monotonic()
        done = cli("run", MODEL, "-n", "2", PROMPT, "--rpc", f"127.0.0.1:{port}")
        assert done.returncode == 1 and f"worker 127.0.0.1:{port}" in done.stderr, done.stderr
        assert time.monotonic() - start < 30  # no hang
    finally:
        http.kill()
    bad = cli("run", MODEL, "-n", "2", PROMPT, "--rpc", "nonsense")
    assert bad.returncode == 2 and "--rpc takes HOST:PORT" in bad.stderr


@pytest.mark.slow
def test_worker_killed_during_generation(tmp_path: Path, home: Path) -> None:
    proc_a, a = start_worker(tmp_path)
    proc_b, b = start_worker(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update(EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT))
    run = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "run", MODEL, "--temp", "0", "-n", "4000", "--stop", "NEVER", "--rpc", f"{a},{b}",
         "--gpu-layers", "all", "Write a very long story about a dragon."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL)
    try:
        assert run.stdout.read(20)  # it is generating
        proc_b.send_signal(signal.SIGKILL)
        proc_b.wait()
        _, err = run.communicate(timeout=60)  # never a hang
        assert run.returncode == 1
        message = err.decode().strip().splitlines()[-1]
        assert f"worker {b} stopped answering" in message, err.decode()[-2000:]
    finally:
        for p in (run, proc_a, proc_b):
            p.kill()
            p.wait()


def test_worker_refuses_a_public_address_without_allow_remote(cli) -> None:
    done = cli("worker", "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2 and "not a loopback address" in done.stderr and "--allow-remote" in done.stderr


@pytest.mark.slow
def test_server_stays_up_when_a_worker_dies(tmp_path: Path, smollm2: Path) -> None:
    import openai

    from tests.test_server import Server

    proc_a, a = start_worker(tmp_path)
    proc_b, b = start_worker(tmp_path)
    server = Server(tmp_path / "home", smollm2, "--rpc", f"{a},{b}", "--gpu-layers", "all")
    try:
        client = server.client(timeout=60)
        first = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": PROMPT}],
                                               max_tokens=16, temperature=0)
        assert "Berlin" in first.choices[0].message.content
        stream = client.chat.completions.create(
            model=server.name, messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
            max_tokens=900, temperature=0, stream=True)  # greedy, this runs to max_tokens
        chunks = iter(stream)
        next(chunks)  # generating over both workers
        proc_b.kill()
        proc_b.wait()
        with pytest.raises(openai.APIError, match=f"worker {b} stopped answering"):
            for _ in chunks:
                pass
        status, health, _ = server.raw("/health")
        assert status == 200 and health["status"] == "degraded" and f"worker {b} stopped answering" in health["error"]
        assert server.proc.poll() is None
        # the next request says which worker is missing, at once
        status, body, _ = server.raw("/v1/chat/completions", {"model": server.name, "messages": [
            {"role": "user", "content": "hi"}]})
        assert status >= 400 and f"worker {b} is unreachable" in body["error"]["message"]
    finally:
        server.stop()
        for p in (proc_a, proc_b):
            p.kill()
            p.wait()
