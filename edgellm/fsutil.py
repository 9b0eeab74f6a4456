"""The one way edgellm writes files: into a temporary sibling, then renamed into place.

A crash, a Ctrl-C or a failed validation therefore never leaves a half-written model, manifest
or conversation where a reader would find it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from edgellm.errors import StorageError

TMP_PREFIX = ".edgellm-tmp-"
STALE_AFTER = 600  # seconds: a temporary without its owner's pid (older edgellm) is stale after this


def tmp_prefix(kind: str = "") -> str:
    """Temporary names carry the owner's pid, so a later run can tell a killed writer's leftovers
    (``clean_stale``) from a live one's work."""
    return f"{TMP_PREFIX}{os.getpid()}-{kind}"


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (os.umask both sets and
    reads, which would race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def clean_stale(folder: Path) -> tuple[int, int]:
    """Remove the temporaries in ``folder`` whose writer is gone (killed mid-write: SIGKILL, a power
    cut); returns (how many, bytes reclaimed). A live process's temporaries are left alone."""
    import time

    count = reclaimed = 0
    try:
        candidates = [p for p in Path(folder).iterdir() if p.name.startswith(TMP_PREFIX)]
    except OSError:
        return 0, 0
    for path in candidates:
        owner = path.name[len(TMP_PREFIX):].split("-", 1)[0]
        try:
            stale = not _alive(int(owner)) if owner.isdigit() else time.time() - path.lstat().st_mtime > STALE_AFTER
            if not stale:
                continue
            size = _size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue
        count, reclaimed = count + 1, reclaimed + size
    return count, reclaimed


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an inter-process lock on ``path``, a lock file that is gone again once released.

    The holder deletes the file before letting go; a process that was waiting on the deleted file
    then sees that its file is no longer the one at ``path`` and tries again on a fresh one.
    """
    try:
        import fcntl
    except ImportError:  # Windows: a lock file that stays
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for binary reading only if it is a regular file: a FIFO or a device named by
    mistake would hang or never end. Raises OSError (IsADirectoryError, or ``EINVAL`` for another
    kind of file) like open() does."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; it replaces ``dest`` only if the block succeeds. A
    destination that cannot be written (its folder is a file, or read-only) is a StorageError
    before the block runs, not a traceback after it. What a killed writer left in that folder is
    removed first: only the store is cleaned otherwise, and ``-o FILE`` writes anywhere."""
    dest = Path(dest)
    clean_stale(dest.parent)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=tmp_prefix(), suffix=dest.suffix, dir=dest.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {dest}: {exc.strerror or exc}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would have made it: mkstemp's is owner-only
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; it becomes ``dest`` only if the block succeeds.

    ``dest`` must not exist yet: a rename never merges into or replaces a folder someone reads.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=tmp_prefix(), dir=dest.parent))
    try:
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would have made it: mkdtemp's is owner-only
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
