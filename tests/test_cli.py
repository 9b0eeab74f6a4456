"""The real `edgellm` command: answers, chat sessions, and every bad input as one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, tree
from tests.ggufcraft import Craft

FAST = ["--temperature", "0", "--ctx", "1024"]


def test_run_answers_and_is_deterministic(cli, smollm2: Path) -> None:
    first = cli("run", str(smollm2), "What is the capital of Germany?", "-n", "16", *FAST)
    assert first.returncode == 0, first.stderr
    assert "Berlin" in first.stdout
    second = cli("run", str(smollm2), "What is the capital of Germany?", "-n", "16", *FAST)
    assert first.stdout == second.stdout
    assert first.stderr == ""  # llama.cpp's log stays out of the user's way


def test_prompt_may_follow_the_options(cli, smollm2: Path) -> None:
    r = cli("run", str(smollm2), "-n", "16", *FAST, "What is the capital", "of Germany?")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout


def test_run_reads_stdin_and_prints_json(cli, smollm2: Path) -> None:
    r = cli("run", str(smollm2), "--json", "-n", "8", *FAST, input="What is the capital of Germany?\n")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"] == smollm2.stem
    assert "Berlin" in data["response"]
    assert data["finish_reason"] in ("stop", "length")
    assert data["completion_tokens"] <= 8
    assert data["prompt_tokens"] > 10
    assert data["timings"]["tokens_per_second"] > 0


def test_run_follows_a_json_schema_and_shows_logprobs(cli, smollm2: Path, tmp_path: Path) -> None:
    """The sampling options the server has work in `run` too: a schema-constrained answer (from a
    file), per-token log-probabilities, and penalties."""
    schema = tmp_path / "capital.json"
    schema.write_text(json.dumps({"type": "object", "properties": {
        "capital": {"enum": ["Paris", "Berlin", "Rome"]}, "population_millions": {"type": "integer"}},
        "required": ["capital", "population_millions"]}))
    r = cli("run", str(smollm2), "--json", "--json-schema", str(schema), "--logprobs", "2", "-n", "48", *FAST,
            "--presence-penalty", "0.5", "--frequency-penalty", "0.5", "What is the capital of Germany? Answer in JSON.")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    answer = json.loads(data["response"])
    assert answer["capital"] == "Berlin" and isinstance(answer["population_millions"], int)
    assert len(data["logprobs"]) == data["completion_tokens"]
    first = data["logprobs"][0]
    assert first["logprob"] <= 0 and len(first["top"]) == 2
    assert first["top"][0]["logprob"] >= first["top"][1]["logprob"]


def test_run_verbose_prints_speed(cli, smollm2: Path) -> None:
    r = cli("run", str(smollm2), "Hi", "-n", "8", "-v", *FAST)
    assert r.returncode == 0
    assert "tok/s" in r.stderr


def test_run_with_the_bundled_model_by_name(cli) -> None:
    r = cli("run", "smollm2-135m-instruct", "What is the capital of Germany?", "-n", "12", *FAST)
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout


def test_chat_session_commands(cli, tmp_path: Path) -> None:
    script = "\n".join(
        [
            "What is the capital of Germany?",
            "/save one.json",
            "/system You are a pirate.",
            "Hello!",
            "/save two.json",
            "/reset",
            "/save three.json",
            "/nonsense",
            "/bye",
            "never read",
        ]
    )
    r = cli("chat", "-n", "12", *FAST, input=script + "\n")
    assert r.returncode == 0, r.stderr
    assert "Berlin" in r.stdout
    assert len([line for line in r.stderr.splitlines() if " tok/s" in line]) == 2
    assert "unknown command /nonsense" in r.stderr
    one = json.loads((tmp_path / "one.json").read_text())
    assert one["model"] == "smollm2-135m-instruct"
    assert [m["role"] for m in one["messages"]] == ["user", "assistant"]
    assert "Berlin" in one["messages"][1]["content"]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["system"] == "You are a pirate."
    assert [m["role"] for m in two["messages"]] == ["system", "user", "assistant"]
    three = json.loads((tmp_path / "three.json").read_text())
    assert [m["role"] for m in three["messages"]] == ["system"]


def test_chat_multi_turn_history_reaches_the_model(cli, tmp_path: Path) -> None:
    r = cli(
        "chat", "-n", "24", *FAST,
        input="Remember the word banana.\nWhat word did I ask you to remember?\n/save h.json\n",
    )
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "h.json").read_text())
    assert [m["content"] for m in saved["messages"] if m["role"] == "user"] == [
        "Remember the word banana.", "What word did I ask you to remember?",
    ]
    assert "banana" in saved["messages"][3]["content"].lower()
    stats = [line for line in r.stderr.splitlines() if "tok/s" in line]
    assert "cached" not in stats[0] and "cached" in stats[1]  # turn two reused turn one's KV cache


def test_ctrl_c_stops_the_answer_not_the_program(home: Path, tmp_path: Path, smollm2: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
    env.update(EDGELLM_HOME=str(home), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgellm", "chat", str(smollm2), "--temperature", "1", "--seed", "3",
         "--ctx", "2048", "--stop", "NEVER"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )
    proc.stdin.write("Write a very long story about a dragon, with many chapters.\n")
    proc.stdin.flush()
    seen = b""
    while len(seen) < 20:  # the answer has started streaming
        piece = os.read(proc.stdout.fileno(), 64)
        assert piece, "no answer started"
        seen += piece
    assert seen, "no answer started"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.stdin.write("/save story.json\n/bye\n")
    proc.stdin.flush()
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    stderr = proc.stderr.read()
    assert "stopped" in stderr
    saved = json.loads((tmp_path / "story.json").read_text())
    answer = saved["messages"][-1]["content"]
    assert saved["messages"][-1]["role"] == "assistant" and answer
    assert len(answer) < 8000  # stopped long before the 2048-token context filled


# -- bad inputs: one line, a non-zero exit, nothing created or removed ------------------------


def _not_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "notes.gguf"
    path.write_text("these are my notes, not a model\n")
    return path


def _truncated(tmp_path: Path, smollm2: Path) -> Path:
    path = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as fh:
        path.write_bytes(fh.read(3_000_000))
    return path


def _absurd(tmp_path: Path) -> Path:
    path = tmp_path / "absurd.gguf"
    path.write_bytes(Craft(n_kv=1 << 62).build())
    return path


def _not_a_model(tmp_path: Path) -> Path:
    path = tmp_path / "craft.gguf"
    path.write_bytes(Craft().build())  # a valid header, but no hyperparameters or weights
    return path


def _evil_template(tmp_path: Path) -> Path:
    path = tmp_path / "evil.jinja"
    path.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return path


def _endless_template(tmp_path: Path) -> Path:
    path = tmp_path / "endless.jinja"
    path.write_text("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}")
    return path


BAD = {
    "missing model": (lambda t, m: ["run", "nosuch", "hi"], 1, "error: model 'nosuch' not found"),
    "missing file": (lambda t, m: ["run", str(t / "nowhere.gguf"), "hi"], 1, "error: no such file:"),
    "not a gguf": (lambda t, m: ["run", str(_not_gguf(t)), "hi"], 1, "error: notes.gguf is not a GGUF file"),
    "truncated": (lambda t, m: ["run", str(_truncated(t, m)), "hi"], 1, "error: cut.gguf: truncated GGUF"),
    "absurd counts": (lambda t, m: ["show", str(_absurd(t))], 1, "more than the file could hold"),
    "valid header, not a model": (
        lambda t, m: ["run", str(_not_a_model(t)), "hi"], 1,
        "error: llama.cpp could not load craft.gguf: llama_model_load: error loading model: "
        "error loading model hyperparameters: key not found in model: llama.embedding_length",
    ),
    "import not a gguf": (lambda t, m: ["import", str(_not_gguf(t))], 1, "is not a GGUF file"),
    "unknown kv type": (lambda t, m: ["run", str(m), "hi", "--kv-type", "q3_0"], 2, "error: unknown KV cache type 'q3_0'"),
    "bad kv pair": (lambda t, m: ["run", str(m), "hi", "--kv-type", "q8_0,,"], 2, "--kv-type takes K or K,V"),
    "context too long": (lambda t, m: ["run", str(m), "hi", "--ctx", "16384"], 2, "is longer than the 8192 tokens"),
    "quantized v without flash attention": (
        lambda t, m: ["run", str(m), "hi", "--kv-type", "q4_0", "--flash-attn", "off"], 2,
        "a quantized V cache (q4_0) needs flash attention",
    ),
    "evil template": (
        lambda t, m: ["run", str(m), "hi", "--template", str(_evil_template(t))], 1,
        "the --template chat template was refused: it reaches for Python internals (__class__)",
    ),
    "endless template": (
        lambda t, m: ["run", str(m), "hi", "--template", str(_endless_template(t))], 1,
        "ran too long and was stopped",
    ),
    "missing template file": (lambda t, m: ["run", str(m), "hi", "--template", str(t / "none.jinja")], 2, "cannot read template"),
    "no prompt": (lambda t, m: ["run", str(m)], 2, "error: no prompt given"),
    "bad temperature": (lambda t, m: ["run", str(m), "hi", "--temperature", "-1"], 2, "temperature must be >= 0"),
    "unknown option": (lambda t, m: ["run", str(m), "hi", "--bogus"], 2, "error: unrecognized arguments: --bogus"),
    "schema not json": (lambda t, m: ["run", str(m), "hi", "--json-schema", "{nope"], 2,
                        "error: --json-schema is not valid JSON"),
    "schema file missing": (lambda t, m: ["run", str(m), "hi", "--json-schema", str(t / "no.json")], 2,
                            "error: cannot read --json-schema file"),
    "logprobs without json": (lambda t, m: ["run", str(m), "hi", "--logprobs", "2"], 2, "--logprobs shows in the --json"),
    "penalty out of range": (lambda t, m: ["run", str(m), "hi", "--presence-penalty", "3"], 2,
                             "presence penalty must be in [-2, 2]"),
    "unknown command": (lambda t, m: ["frobnicate"], 2, "error: argument COMMAND: invalid choice: 'frobnicate'"),
    "show unknown": (lambda t, m: ["show", "nosuch"], 1, "error: model 'nosuch' not found"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_line(case: str, cli, home: Path, tmp_path: Path, smollm2: Path) -> None:
    make_args, code, message = BAD[case]
    args = make_args(tmp_path, smollm2)
    before, before_cwd = tree(home), tree(tmp_path)
    start = time.perf_counter()
    r = cli(*args)
    assert time.perf_counter() - start < 30
    assert r.returncode == code, r.stderr
    assert message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert tree(home) == before
    assert tree(tmp_path) == before_cwd


def test_bad_environment_value(cli, smollm2: Path) -> None:
    r = cli("run", str(smollm2), "hi", env={"EDGELLM_CTX": "lots"})
    assert r.returncode == 2
    assert r.stderr.strip() == "error: EDGELLM_CTX: invalid value 'lots' for ctx: not a whole number"


def test_long_context_allowed_with_the_flag(cli, smollm2: Path) -> None:
    r = cli("run", str(smollm2), "Hi", "-n", "2", "--ctx", "9000", "--allow-long-context", "--kv-type", "q8_0")
    assert r.returncode == 0, r.stderr


def test_debug_shows_the_traceback(cli) -> None:
    r = cli("run", "nosuch", "hi", env={"EDGELLM_DEBUG": "1"})
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr


def test_help_and_version(cli) -> None:
    r = cli("--help")
    assert r.returncode == 0
    for command in ("chat", "run", "list", "show", "import", "rm"):
        assert command in r.stdout
    assert cli("--version").stdout.startswith("edgellm ")


def test_heavy_modules_are_not_imported_for_help() -> None:
    code = (
        "import sys, edgellm, edgellm.cli\n"
        "parser = edgellm.cli.build_parser()\n"
        "parser.format_help()\n"
        "heavy = ['llama_cpp', 'numpy', 'transformers', 'torch', 'textual', 'gguf', 'rich', 'minijinja', 'huggingface_hub']\n"
        "print([m for m in heavy if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
