"""Where models live and how a MODEL argument becomes a validated GGUF file.

A model is named by its store name or by a path to a ``.gguf`` file, everywhere one is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from edgellm.config import Settings
from edgellm.errors import ModelNotFoundError
from edgellm.gguf.header import GGUFHeader, read_header
from edgellm.models.bundled import BUNDLED_NAME, ensure_bundled
from edgellm.models.store import ModelEntry, Store
from edgellm.options import LoadOptions

__all__ = ["ModelEntry", "ResolvedModel", "Store", "load_options", "looks_like_path", "resolve", "store_for"]


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    header: GGUFHeader
    entry: ModelEntry | None = None


def store_for(settings: Settings) -> Store:
    return Store(settings.models_dir)


def load_options(settings: Settings) -> LoadOptions:
    """The settings' load options with the draft model, named by store name or path, made a file."""
    load = settings.load
    if load.draft:
        load = replace(load, draft=str(resolve(load.draft, settings).path))
    return load


def looks_like_path(ref: str) -> bool:
    return ref.lower().endswith(".gguf") or "/" in ref or "\\" in ref or Path(ref).is_file()


def resolve(ref: str | None, settings: Settings, store_only: bool = False) -> ResolvedModel:
    """Turn a MODEL argument (or the configured default) into a validated GGUF.

    With no argument, the configured ``model`` setting is used, else the bundled SmolLM2,
    which is registered in the store the first time it is asked for. ``store_only``: ``ref`` is a
    store name and never a path (the server's ``model`` field).
    """
    ref = ref or settings.model or BUNDLED_NAME
    if not store_only and looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise ModelNotFoundError(f"no such file: {ref}")
        header = read_header(path)
        return ResolvedModel(path.stem, path, header)
    store = store_for(settings)
    if ref == BUNDLED_NAME and not store.exists(ref):
        entry = ensure_bundled(store)
    else:
        entry = store.get(ref.lower())
    header = read_header(entry.gguf_path)
    return ResolvedModel(entry.name, entry.gguf_path, header, entry)
