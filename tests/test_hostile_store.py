"""Hostile files and folders against the store and the CLI: a copied model folder, manifests that
point outside their folder or hold the wrong types, terminal escapes in a model's name, a FIFO
named as a model, and what killed writers leave behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from edgellm.fsutil import exclusive
from tests.ggufcraft import Craft, kv_str


def _import(cli, smollm2: Path, name: str) -> Path:
    r = cli("import", str(smollm2), "--name", name)
    assert r.returncode == 0, r.stderr
    return cli.home / "models" / name


def test_rm_of_a_copied_folder_removes_the_copy_not_the_original(cli, smollm2: Path) -> None:
    orig = _import(cli, smollm2, "orig")
    shutil.copytree(orig, orig.with_name("orig-backup"))  # its manifest still says "orig"
    r = cli("rm", "orig-backup")
    assert r.returncode == 0 and r.stdout.strip() == "removed orig-backup"
    assert (orig / "manifest.json").is_file() and not orig.with_name("orig-backup").exists()
    assert json.loads(cli("list", "--json").stdout)[0]["name"] == "orig"


def _tamper(folder: Path, **fields) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, **fields}))


def test_manifests_are_untrusted_data(cli, smollm2: Path, tmp_path: Path) -> None:
    good = _import(cli, smollm2, "good")
    secret = tmp_path / "secret.gguf"
    shutil.copy(smollm2, secret)
    cases = {"escapes": {"file": "../../../" + secret.name}, "absolute": {"file": str(secret)},
             "lots": {"parameters": "lots"}, "list": {"size": [1]}, "null-name": {"file": None}}
    for name, fields in cases.items():
        shutil.copytree(good, good.with_name(name))
        _tamper(good.with_name(name), **fields)
    (good.with_name("not-json") / "").mkdir()
    (good.with_name("not-json") / "manifest.json").write_text("[" * 100_000)
    r = cli("list")
    assert r.returncode == 0, r.stderr
    for name in [*cases, "not-json"]:
        assert f"{name}" in r.stdout and "broken" in r.stdout.split(name, 1)[1].splitlines()[0], r.stdout
    listed = json.loads(cli("list", "--json").stdout)
    assert [row["name"] for row in listed if "broken" not in row] == ["good"]
    for name in ("escapes", "absolute"):
        r = cli("run", name, "hi", "-n", "1")
        assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
        assert "damaged manifest" in r.stderr and "not a file name inside the model's folder" in r.stderr
    assert cli("rm", "lots").returncode == 0 and not good.with_name("lots").exists()
    assert secret.is_file()


def test_show_strips_terminal_escapes_from_model_strings(cli, tmp_path: Path) -> None:
    craft = Craft()
    craft.kvs = [*craft.kvs, kv_str("general.name", "\x1b[31mEVIL\x1b]0;pwned\x07\u202e[bold]x[/bold]")]
    path = tmp_path / "evil.gguf"
    path.write_bytes(craft.build())
    for args in (["show", str(path)], ["show", str(path), "--json"]):
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        assert "EVIL" in r.stdout
        assert not any(c in r.stdout for c in ("\x1b", "\x07", "\u202e")), repr(r.stdout)
    assert "[bold]x[/bold]" in cli("show", str(path)).stdout  # shown as text, not taken as markup


def test_a_fifo_is_refused_at_once(cli, tmp_path: Path) -> None:
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    start = time.monotonic()
    for args in (["import", str(fifo)], ["show", str(fifo)], ["run", str(fifo), "hi"]):
        r = cli(*args, timeout=20)
        assert r.returncode != 0 and "is not a regular file" in r.stderr, r.stderr
    assert time.monotonic() - start < 20


def test_list_reclaims_what_killed_writers_left_but_not_live_work(cli, smollm2: Path) -> None:
    models = _import(cli, smollm2, "good").parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = models / f".edgellm-tmp-{dead.pid}-abc"
    stale.mkdir()
    (stale / "half.gguf").write_bytes(b"\0" * (3 << 20))
    live = models / f".edgellm-tmp-{os.getpid()}-xyz"
    live.mkdir()
    r = cli("list")
    assert r.returncode == 0
    assert "reclaimed 3.0 MiB left by 1 interrupted operation" in r.stderr
    assert not stale.exists() and live.is_dir()
    assert "reclaimed" not in cli("list").stderr


def test_the_lock_file_is_gone_after_use_and_still_excludes(tmp_path: Path) -> None:
    lock = tmp_path / ".model.lock"
    inside, overlaps = [], []

    def worker() -> None:
        for _ in range(30):
            with exclusive(lock):
                inside.append(1)
                overlaps.append(len(inside))
                time.sleep(0.001)
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(overlaps) == 1 and len(overlaps) == 120
    assert not lock.exists()
