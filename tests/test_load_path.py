"""The model-load path imports nothing it does not need (issue: CUDA builds crashed in every command).

A process that imported gguf-py (and with it sentencepiece's C++ extension) before llama.cpp's CUDA
libraries segfaults in the next ``llama_model_load_from_file``. No GPU here, so these tests pin the
cause instead: at the moment llama.cpp loads a model, in every command that loads one, none of
those modules may be in the process; and where edgellm does need gguf-py (the converter), llama.cpp's
libraries are loaded first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_server import _free_port


def _env(home: Path, spy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update(EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT), LOAD_SPY_OUT=str(spy))
    return env


def _loads(spy: Path) -> list[list[str]]:
    return [json.loads(line) for line in spy.read_text().splitlines()] if spy.exists() else []


@pytest.mark.parametrize("argv", [
    ["run", "{model}", "Hi", "-n", "3", "--temperature", "0"],
    ["chat", "{model}", "-n", "3"],
    ["bench", "{model}", "-p", "8", "-n", "2", "-r", "1"],
    ["eval", "{model}", "--text", "{text}", "--ctx", "64"],
], ids=["run", "chat", "bench", "eval"])
def test_commands_load_models_without_gguf_or_sentencepiece(argv, smollm2: Path, tmp_path: Path) -> None:
    spy = tmp_path / "spy.jsonl"
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    args = [a.format(model=smollm2, text=text) for a in argv]
    done = subprocess.run([sys.executable, "-m", "tests.load_spy", *args], input="Hello\n", capture_output=True,
                          text=True, env=_env(tmp_path / "home", spy), cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stderr
    loads = _loads(spy)
    assert loads, "the spy saw no model load"
    assert loads == [[]] * len(loads)


def test_serve_loads_models_without_gguf_or_sentencepiece(smollm2: Path, tmp_path: Path) -> None:
    spy = tmp_path / "spy.jsonl"
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.load_spy", "serve", str(smollm2), "--port", str(port), "--ctx", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(tmp_path / "home", spy), cwd=ROOT,
    )
    try:
        body = json.dumps({"model": smollm2.stem, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
        deadline = time.monotonic() + 60
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body.encode(),
                                                 {"Content-Type": "application/json"})
                answer = json.load(urllib.request.urlopen(request, timeout=60))
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert answer["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    loads = _loads(spy)
    assert loads and loads == [[]] * len(loads)


def test_the_converter_loads_llama_cpp_before_gguf() -> None:
    """The app converts a checkpoint and then chats with it in one process: by then gguf is loaded,
    so llama.cpp's libraries must have been loaded before it."""
    code = (
        "import sys\n"
        "order = []\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('llama_cpp', 'gguf') and name not in order: order.append(name)\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import edgellm.convert.core, edgellm.convert.lora, edgellm.quantize\n"
        "print(','.join(order))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "llama_cpp,gguf"


def test_ggml_type_tables_agree_with_llama_cpp() -> None:
    """The header reader's own tables say what the llama.cpp we run says (gguf 0.19.0's own table
    is wrong for Q8_1: 40 bytes a block where ggml has 36)."""
    import ctypes

    from edgellm.gguf.ggml_types import FILE_TYPES, GGML_TYPES
    from edgellm.system.ggml import shipped_library

    ggml = shipped_library("libggml-base")
    ggml.ggml_type_size.restype = ctypes.c_size_t
    ggml.ggml_blck_size.restype = ctypes.c_int64
    ggml.ggml_type_name.restype = ctypes.c_char_p
    for type_id, (name, block, size) in GGML_TYPES.items():
        assert ggml.ggml_type_name(type_id).decode().upper() == name
        assert (ggml.ggml_blck_size(type_id), ggml.ggml_type_size(type_id)) == (block, size), name
    import llama_cpp

    named = {getattr(llama_cpp, key): key.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_") for key in dir(llama_cpp)
             if key.startswith(("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_"))}
    assert len(named) > 25
    for ftype, name in named.items():
        assert FILE_TYPES[ftype] == name
