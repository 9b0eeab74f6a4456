"""The local model store: one folder per model under ``$EDGELLM_HOME/models``.

Each folder holds the model's GGUF file and ``manifest.json`` describing it, so listing the store
never has to open a model. Folders appear and disappear by a single rename, so a reader never sees
a half-imported or half-removed model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from edgellm.errors import EdgeLLMError, ModelExistsError, ModelNotFoundError, StorageError, UsageError
from edgellm.fsutil import TMP_PREFIX, atomic_dir, clean_stale, tmp_prefix
from edgellm.gguf.header import GGUFHeader, printable, read_header

MANIFEST = "manifest.json"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_CHUNK = 8 << 20


@dataclass(frozen=True)
class Manifest:
    name: str
    file: str
    source: str
    size: int
    sha256: str
    architecture: str
    parameters: int
    quantization: str
    context_length: int | None
    has_chat_template: bool
    created: str

    @classmethod
    def from_header(cls, name: str, file: str, source: str, sha256: str, header: GGUFHeader) -> Manifest:
        return cls(
            name=name,
            file=file,
            source=source,
            size=header.file_size,
            sha256=sha256,
            architecture=printable(header.architecture),
            parameters=header.parameter_count,
            quantization=printable(header.quantization),
            context_length=header.context_length,
            has_chat_template=bool(header.chat_template),
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )


#: each manifest field's type; a manifest is untrusted data (a copied folder, an edited file)
_FIELD_TYPES = {"name": str, "file": str, "source": str, "size": int, "sha256": str, "architecture": str,
                "parameters": int, "quantization": str, "context_length": (int, type(None)),
                "has_chat_template": bool, "created": str}


def _manifest(data: object) -> Manifest:
    """A manifest from parsed JSON, each field checked; its file must be a plain name in the folder."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for key, kind in _FIELD_TYPES.items():
        value = data.get(key)
        if key not in data or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"field {key!r} is missing or not a {getattr(kind, '__name__', 'value')}")
    file = data["file"]
    if not file or file in (".", "..") or "/" in file or "\\" in file or "\0" in file or file != Path(file).name:
        raise ValueError(f"field 'file' is {file!r}, not a file name inside the model's folder")
    return Manifest(**{key: data[key] for key in _FIELD_TYPES})


@dataclass(frozen=True)
class ModelEntry:
    manifest: Manifest
    folder: Path

    @property
    def name(self) -> str:
        """The folder is the model's identity: a copied folder's manifest still names the original."""
        return self.folder.name

    @property
    def gguf_path(self) -> Path:
        return self.folder / self.manifest.file


def check_name(name: str) -> str:
    """Store names become folder names, so only a safe alphabet is allowed (no ``..``, no ``/``)."""
    if not NAME_RE.match(name) or ".." in name:
        raise UsageError(
            f"invalid model name {name!r}",
            hint="use lower-case letters, digits, '.', '_' and '-', starting with a letter or digit",
        )
    return name


def name_from_file(path: Path) -> str:
    """A store name derived from a file name: ``SmolLM2-135M.Q4_1.gguf`` -> ``smollm2-135m.q4_1``."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")
    return (stem or "model")[:128]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _folder(self, name: str) -> Path:
        return self.root / check_name(name)

    def _folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [f for f in sorted(self.root.iterdir())
                if not f.name.startswith(TMP_PREFIX) and NAME_RE.match(f.name) and (f / MANIFEST).is_file()]

    def list(self) -> list[ModelEntry]:
        """The store's models; a damaged one is left out here (``scan()`` names it)."""
        return self.scan()[0]

    def scan(self) -> tuple[list[ModelEntry], list[tuple[str, str]]]:
        """The store's models, and (name, what is wrong) for each folder whose manifest cannot be used."""
        entries, broken = [], []
        for folder in self._folders():
            try:
                entries.append(self._read(folder))
            except EdgeLLMError as exc:
                broken.append((folder.name, exc.message))
        return entries, broken

    def clean_stale(self) -> tuple[int, int]:
        """Remove what killed imports, conversions, quantizations and removals left in the store:
        (how many, bytes reclaimed)."""
        return clean_stale(self.root)

    def _read(self, folder: Path) -> ModelEntry:
        try:
            with open(folder / MANIFEST, "rb") as fh:
                raw = fh.read(1 << 20)  # a manifest is a few hundred bytes
            manifest = _manifest(json.loads(raw))
        except RecursionError:
            raise StorageError(f"damaged manifest in {folder.name}: nested too deeply") from None
        except (OSError, ValueError, TypeError) as exc:
            raise StorageError(f"damaged manifest in {folder.name}: {exc}") from None
        return ModelEntry(manifest, folder)

    def get(self, name: str) -> ModelEntry:
        folder = self._folder(name)
        if not (folder / MANIFEST).is_file():
            names = [e.name for e in self.list()]
            hint = "models in the store: " + ", ".join(names) if names else "the store is empty"
            raise ModelNotFoundError(f"model {name!r} not found", hint=hint + "; see `edgellm list`")
        return self._read(folder)

    def exists(self, name: str) -> bool:
        return (self._folder(name) / MANIFEST).is_file()

    def import_gguf(
        self, src: Path, name: str | None = None, source: str | None = None, link: bool = False
    ) -> ModelEntry:
        """Validate a GGUF and add it to the store; with ``link``, hard-link instead of copying."""
        src = Path(src)
        header = read_header(src)

        def place(dest: Path) -> None:
            if link:
                try:
                    os.link(src, dest)
                    return
                except OSError:
                    pass
            shutil.copyfile(src, dest)

        return self.create(
            name_from_file(src) if name is None else name,
            src.name,
            source or f"file:{src.resolve()}",
            place,
            expected_size=header.file_size,
        )

    def create(
        self,
        name: str,
        filename: str,
        source: str,
        write: Callable[[Path], None],
        expected_size: int = 0,
    ) -> ModelEntry:
        """Add a model whose GGUF ``write(path)`` produces; it appears only once it is complete.

        The file is validated and hashed before the model's folder is renamed into place, so a
        failed or interrupted writer leaves the store exactly as it was.
        """
        name = check_name(name)
        folder = self._folder(name)
        exists = ModelExistsError(f"model {name!r} already exists", hint="choose another --name or `edgellm rm` it first",
                                  app_hint="give it another name, or delete the one there (d in the library)")
        if folder.exists():
            raise exists
        self._check_space(expected_size)
        try:
            with atomic_dir(folder) as tmp:
                dest = tmp / filename
                write(dest)
                header = read_header(dest)
                manifest = Manifest.from_header(name, filename, source, sha256_file(dest), header)
                # a split model's other parts sit beside the first: the model's size is all of them
                manifest = replace(manifest, size=sum(p.stat().st_size for p in tmp.iterdir()))
                (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n", "utf-8")
        except OSError as exc:
            if folder.exists():  # another process created the same name meanwhile
                raise exists from None
            raise StorageError(f"cannot write {filename} into the store: {exc.strerror or exc}") from None
        return ModelEntry(manifest, folder)

    def copy(self, name: str, new_name: str) -> ModelEntry:
        """The model ``name`` under another name too: its files hard-linked where the disk allows
        (no bytes copied; removing either name leaves the other whole), else copied."""
        entry = self.get(name)

        def place(dest: Path) -> None:
            for part in sorted(entry.folder.iterdir()):
                if part.name == MANIFEST:
                    continue
                target = dest if part.name == entry.manifest.file else dest.parent / part.name
                try:
                    os.link(part, target)
                except OSError:
                    shutil.copyfile(part, target)

        return self.create(new_name, entry.manifest.file, f"copy:{entry.name}", place)

    def _check_space(self, needed: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < needed + (64 << 20):
            raise StorageError(
                f"not enough disk space in {self.root}: {needed >> 20} MiB needed, {free >> 20} MiB free"
            )

    def remove(self, name: str) -> str:
        """Delete the model in folder ``name`` (a damaged one too); returns the name removed."""
        folder = self._folder(name)
        if not (folder / MANIFEST).is_file():
            self.get(name)  # raises with the store's models as a hint
        # rename first so the model vanishes at once, even if deleting the bytes is slow
        doomed = folder.with_name(f"{tmp_prefix('rm-')}{folder.name}")
        os.rename(folder, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        return folder.name
