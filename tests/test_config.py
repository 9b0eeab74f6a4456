"""Settings precedence: CLI > EDGELLM_* > config file > defaults; EDGELLM_HOME moves every path."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgellm.config import Settings
from edgellm.errors import ConfigError


def test_defaults(home: Path) -> None:
    s = Settings.resolve()
    assert s.home == home
    assert s.models_dir == home / "models"
    assert s.config_file == home / "config.toml"
    assert (s.load.n_ctx, s.load.type_k, s.load.flash_attn) == (None, "f16", "auto")
    assert s.sampling.temperature == 0.8


def test_cli_beats_env_beats_file_beats_defaults(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text('ctx = 1024\ntemperature = 0.5\nkv_type_k = "q8_0"\nstop = ["END"]\n')
    s = Settings.resolve()
    assert (s.load.n_ctx, s.sampling.temperature, s.load.type_k, s.sampling.stop) == (1024, 0.5, "q8_0", ("END",))
    monkeypatch.setenv("EDGELLM_CTX", "2048")
    monkeypatch.setenv("EDGELLM_FLASH_ATTN", "off")
    s = Settings.resolve()
    assert (s.load.n_ctx, s.sampling.temperature, s.load.flash_attn) == (2048, 0.5, "off")
    s = Settings.resolve({"ctx": 512, "temperature": None})
    assert (s.load.n_ctx, s.sampling.temperature) == (512, 0.5)


def test_auto_values_and_sizes(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.resolve().load.n_gpu_layers is None  # auto by default: the planner decides
    monkeypatch.setenv("EDGELLM_GPU_LAYERS", "all")
    assert Settings.resolve().load.n_gpu_layers == -1
    assert Settings.resolve({"gpu_layers": "12"}).load.n_gpu_layers == 12
    assert Settings.resolve({"gpu_layers": "auto"}).load.n_gpu_layers is None
    assert Settings.resolve({"ctx": "auto"}).load.n_ctx == 0
    assert Settings.resolve({"kv_type_k": "auto"}).load.type_k == "auto"
    monkeypatch.setenv("EDGELLM_GPU_MEMORY", "6GiB")
    assert Settings.resolve({"ram": "512 MiB"}).ram == 512 * 2**20
    assert Settings.resolve().gpu_memory == 6 * 2**30


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EDGELLM_CTX": "big"}, "EDGELLM_CTX: invalid value 'big' for ctx"),
        ({"EDGELLM_KV_TYPE_V": "q3_0"}, "unknown KV cache type 'q3_0'"),
        ({"EDGELLM_TOP_P": "1.5"}, "top-p must be in (0, 1]"),
        ({"EDGELLM_ALLOW_LONG_CONTEXT": "maybe"}, "must be true or false"),
        ({"EDGELLM_GPU_MEMORY": "lots"}, "not a size: 'lots'"),
    ],
)
def test_bad_env_values(home: Path, monkeypatch: pytest.MonkeyPatch, env: dict, message: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        Settings.resolve()
    assert message in str(err.value)


def test_bad_config_file(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text("ctx = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.resolve()
    (home / "config.toml").write_text("contxt = 5\n")
    with pytest.raises(ConfigError, match="unknown setting 'contxt'"):
        Settings.resolve()


@pytest.mark.parametrize("content, message", [
    (b"ctx = 2048\n# \xff\xfe not text\n", "is not UTF-8 text (byte 13)"),
    (b"ctx = " + b"[" * 5000 + b"]" * 5000 + b"\n", "nests too deeply"),
    (b"# " + b"x" * (2 << 20) + b"\n", "is over 1024 KiB"),
], ids=["not-utf8", "deep-arrays", "huge"])
def test_a_config_file_edgellm_cannot_read_is_one_line(cli, home: Path, content: bytes, message: str) -> None:
    """Every command reads the config file: whatever is in it, a one-line error naming it, exit 2."""
    home.mkdir(parents=True)
    (home / "config.toml").write_bytes(content)
    done = cli("list")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"config file {home / 'config.toml'} {message}" in done.stderr and "Traceback" not in done.stderr


def test_a_config_file_that_is_not_a_file_is_not_waited_on(cli, home: Path) -> None:
    import os

    home.mkdir(parents=True)
    os.mkfifo(home / "config.toml")  # opening a FIFO for reading waits for a writer: forever
    done = cli("list", timeout=20)
    assert done.returncode == 2 and "is not a regular file" in done.stderr and done.stderr.count("\n") == 1
