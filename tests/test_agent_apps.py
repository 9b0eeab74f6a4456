"""The agent apps people point at local servers, run with their default tools against a real
`edgellm serve` of the bundled SmolLM2: Claude Code (`claude -p`, the Messages API) and the Codex
CLI (`codex exec`, the Responses API). Their npm packages are installed once into edgellm's cache
(pinned versions); every byte of their traffic goes to 127.0.0.1, telemetry and updates off.

Their first request carries their whole system prompt and tool set (20k tokens for Claude Code),
which takes this CPU about five minutes to read: the server's stream must stay alive meanwhile.
Every request they send must be answered with a 200; what a 135M model answers is not judged."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.test_server import Server

PACKAGES = ("@anthropic-ai/claude-code@2.1.197", "@openai/codex@0.171.0")
NPM_CACHE = Path.home() / ".cache" / "edgellm" / "npm"
MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def apps() -> Path:
    """The folder of the apps' executables, installed on first use."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    bin_dir = NPM_CACHE / "node_modules" / ".bin"
    if not all((bin_dir / name).exists() for name in ("claude", "codex")):
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--prefix", str(NPM_CACHE), "--no-audit", "--no-fund", *PACKAGES],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return bin_dir


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2: Path):
    """32k tokens of context, as the apps' prompts need, any model name answered by SmolLM2, and
    answers ended at a blank line (a 135M model can ramble on for the context's 12k tokens left,
    which takes this CPU an hour)."""
    s = Server(
        tmp_path_factory.mktemp("home"),
        smollm2,
        "--ctx",
        "32768",
        "--allow-long-context",
        "--stop",
        "\n\n",
        "--alias",
        f"*={MODEL_NAME}",
    )
    yield s
    s.stop()


def test_serve_n_caps_what_every_request_asks(tmp_path: Path, smollm2: Path) -> None:
    """Agents ask 32000 tokens a turn; `serve -n 8` answers with at most 8, as llama-server's -n."""
    capped = Server(tmp_path, smollm2, "-n", "8")
    try:
        for asked, answered in ((32000, 8), (3, 3)):
            reply = capped.client().chat.completions.create(
                model=capped.name,
                messages=[{"role": "user", "content": "Write a long story."}],
                max_tokens=asked,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert reply.usage.completion_tokens == answered and reply.choices[0].finish_reason == "length"
    finally:
        capped.stop()


def _run_app(command: list[str], home: Path, env: dict[str, str]) -> str:
    """Run an app in ``home`` with its network to this machine only and telemetry off; its output."""
    quiet = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "OPENAI_", "CODEX_"))}
    quiet.update(HOME=str(home), DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1",
                 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1", NO_PROXY="127.0.0.1", **env)
    done = subprocess.run(command, cwd=home, env=quiet, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


@pytest.mark.timeout(1800)
def test_claude_code_gets_a_200_for_every_request(apps: Path, server: Server, tmp_path: Path) -> None:
    output = _run_app([str(apps / "claude"), "-p", "--max-turns", "2", "Say hello"], tmp_path,
                      {"ANTHROPIC_BASE_URL": server.base, "ANTHROPIC_API_KEY": "sk-local"})
    assert "API Error" not in output, output


@pytest.mark.timeout(1800)
def test_codex_gets_a_200_for_every_request(apps: Path, server: Server, tmp_path: Path) -> None:
    codex_home = tmp_path / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(
        f'model = "{MODEL_NAME}"\nmodel_provider = "edgellm"\n\n[model_providers.edgellm]\nname = "edgellm"\n'
        f'base_url = "{server.base}/v1"\nwire_api = "responses"\n'
    )
    output = _run_app([str(apps / "codex"), "exec", "--skip-git-repo-check", "Say hello"], tmp_path,
                      {"CODEX_HOME": str(codex_home)})
    assert "ERROR" not in output, output
