"""Pull models from the Hugging Face Hub (``edgellm pull REPO[:QUANT]``): GGUF files into the
store, or a safetensors checkpoint's files for the converter (never pickle weights).

Downloads go through huggingface_hub, so its cache is reused, ``HF_ENDPOINT``/``HF_TOKEN`` are
honoured and an interrupted download resumes; every file is checked against the Hub's size and
sha256 and validated as a GGUF before it becomes a store model. A repo's file listing is untrusted:
names that could escape the store are refused. ``--plan`` reads only the remote header (HTTP range
requests) and asks the planner whether the model fits before anything is downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgellm.errors import (
    EdgeLLMError,
    HubError,
    HubUnreachableError,
    ModelNotFoundError,
    StorageError,
    TruncatedGGUFError,
    UsageError,
)
from edgellm.fsutil import exclusive
from edgellm.gguf.header import GGUFHeader, read_header
from edgellm.gguf.quant_types import QUANT_TYPES
from edgellm.models.store import ModelEntry, Store, check_name

REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*(/[A-Za-z0-9][A-Za-z0-9._+-]*)*$")
SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
#: what conversion needs from a safetensors repo (top-level files only; pickle weights never)
CHECKPOINT_FILE_RE = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json|tokenizer\.model|"
    r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|chat_template\.json|README\.md|"
    r"model\.safetensors\.index\.json|adapter_config\.json|[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors)$"
)
DEFAULT_QUANTS = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q4_0", "Q8_0", "Q6_K", "F16", "BF16")
_QUANT_NAMES = sorted(QUANT_TYPES, key=len, reverse=True)


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int
    sha256: str | None


@dataclass(frozen=True)
class GGUFChoice:
    quant: str
    files: tuple[RemoteFile, ...]  # one, or every part of a split model in order

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def parse_ref(ref: str) -> tuple[str, str | None]:
    repo, _, quant = ref.partition(":")
    if not REPO_RE.match(repo) or ".." in repo:
        raise UsageError(f"invalid repo id {repo!r}", hint="use OWNER/NAME, for example bartowski/SmolLM2-135M-Instruct-GGUF")
    return repo, (quant.upper() or None)


def safe_file_name(name: str) -> bool:
    """A repo file name that stays inside a folder: relative, no ``..``, ordinary characters."""
    return bool(FILE_RE.match(name)) and ".." not in name.split("/") and not name.startswith("/")


def quant_of(filename: str) -> str | None:
    stem = SPLIT_RE.sub(".gguf", Path(filename).name).upper()
    for name in _QUANT_NAMES:
        if re.search(rf"(^|[^A-Z0-9]){re.escape(name)}([^A-Z0-9_]|$)", stem):
            return name
    return None


def _endpoint() -> str | None:
    """HF_ENDPOINT as it is now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_ENDPOINT") or None


def _hub_errors(repo: str, store: Store):
    """Translate huggingface_hub's exceptions into one clear line each."""
    from huggingface_hub import errors as hf

    class Translate:
        def __enter__(self):
            return self

        def __exit__(self, kind, exc, tb) -> bool:
            if exc is None or isinstance(exc, EdgeLLMError):
                return False
            if isinstance(exc, hf.GatedRepoError):
                raise HubError(f"{repo} is gated: accept its terms on the Hub and give a token",
                                   hint="export HF_TOKEN=hf_... (a read token from your Hub settings)") from None
            if isinstance(exc, hf.RepositoryNotFoundError):
                raise ModelNotFoundError(f"repo {repo} not found on the Hub",
                                         hint="check the name; private repos need HF_TOKEN") from None
            if isinstance(exc, (hf.EntryNotFoundError, hf.RevisionNotFoundError)):
                raise ModelNotFoundError(f"{repo}: {exc}".splitlines()[0]) from None
            if isinstance(exc, (hf.LocalEntryNotFoundError, OSError, *_transport_errors())):
                local = ", ".join(e.name for e in store.list()) or "none"
                raise HubUnreachableError(f"cannot reach the Hub ({os.environ.get('HF_ENDPOINT', 'huggingface.co')}): offline?",
                                   hint=f"models available locally: {local}") from None
            if isinstance(exc, hf.HfHubHTTPError):
                raise HubError(f"the Hub answered: {str(exc).splitlines()[0]}") from None
            return False

    return Translate()


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's "could not get an answer" errors (connect, DNS, timeout): huggingface_hub
    speaks HTTP through httpx (1.x) or httpx2 (2.x), whose errors are not OSErrors."""
    import importlib
    import importlib.util

    return tuple(importlib.import_module(name).TransportError for name in ("httpx2", "httpx")
                 if importlib.util.find_spec(name))


@dataclass(frozen=True)
class RepoListing:
    commit: str
    gguf: dict[str, GGUFChoice]  # quant -> files
    checkpoint: tuple[RemoteFile, ...]  # what converting the repo's safetensors needs
    refused: tuple[str, ...]  # names that could escape the store

    @property
    def is_checkpoint(self) -> bool:
        """A safetensors repo with no GGUF: pulled by converting it."""
        names = {f.name for f in self.checkpoint}
        return not self.gguf and any(n.endswith(".safetensors") for n in names) and (
            "config.json" in names or "adapter_config.json" in names)


def list_repo(repo: str, revision: str | None, store: Store) -> RepoListing:
    from huggingface_hub import HfApi

    with _hub_errors(repo, store):
        info = HfApi(endpoint=_endpoint()).model_info(repo, revision=revision, files_metadata=True)
    refused, groups, checkpoint = [], {}, []
    for sib in info.siblings or []:
        name = sib.rfilename
        if not safe_file_name(name):
            refused.append(name)
            continue
        lfs = getattr(sib, "lfs", None)
        remote = RemoteFile(name, int(sib.size or 0), getattr(lfs, "sha256", None) if lfs is not None else None)
        if name.lower().endswith(".gguf"):
            groups.setdefault(quant_of(name) or Path(name).stem, []).append(remote)
        elif CHECKPOINT_FILE_RE.match(name):
            checkpoint.append(remote)
    choices = {q: GGUFChoice(q, tuple(sorted(files, key=lambda f: f.name))) for q, files in groups.items()}
    return RepoListing(info.sha or "", choices, tuple(checkpoint), tuple(refused))


def choose(choices: dict[str, GGUFChoice], quant: str | None, repo: str) -> GGUFChoice:
    if not choices:
        raise ModelNotFoundError(f"{repo} has no GGUF files, nor safetensors weights to convert",
                                 hint="edgellm never loads pickle (.bin/.pt) weights")
    if quant:
        found = choices.get(quant)
        if found is None:
            raise ModelNotFoundError(f"{repo} has no {quant} file",
                                     hint="available: " + ", ".join(f"{q} ({c.size >> 20} MiB)" for q, c in sorted(choices.items())))
        return found
    for preferred in DEFAULT_QUANTS:
        if preferred in choices:
            return choices[preferred]
    return choices[sorted(choices)[0]]


def _verify(path: Path, remote: RemoteFile) -> None:
    size = path.stat().st_size
    if remote.size and size != remote.size:
        raise HubError(f"{remote.name}: downloaded {size} bytes, the Hub says {remote.size}")
    if remote.sha256:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(8 << 20):
                digest.update(chunk)
        if digest.hexdigest() != remote.sha256:
            raise HubError(f"{remote.name}: sha256 does not match the Hub's; the download is damaged")


def _reporting_tqdm(progress: Callable[[int], None]):
    """A tqdm class for huggingface_hub that reports bytes to ``progress`` instead of drawing a bar.

    ``progress`` may raise (a cancelled download): the partial file stays in the Hub cache, so the
    next pull resumes it, and the store is untouched.
    """
    from tqdm.auto import tqdm

    class Reporting(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = kwargs.get("initial") or 0

        def update(self, n: float | None = 1) -> None:
            self.done += n or 0
            progress(int(self.done))

    return Reporting


@dataclass(frozen=True)
class RepoHit:
    repo: str
    downloads: int
    likes: int


def search(text: str, store: Store, limit: int = 20) -> list[RepoHit]:
    """GGUF repos on the Hub whose name holds ``text``, most downloaded first."""
    from huggingface_hub import HfApi

    with _hub_errors("the Hub", store):
        found = HfApi(endpoint=_endpoint()).list_models(search=text, filter="gguf", sort="downloads", limit=limit)
        return [RepoHit(m.id, m.downloads or 0, m.likes or 0) for m in found]


def _download(repo: str, files: tuple[RemoteFile, ...], revision: str | None, store: Store,
              progress: Callable[[int, int], None] | None) -> list[Path]:
    """Fetch files through the Hub cache (resuming partial ones), each checked against the listing."""
    from huggingface_hub import hf_hub_download

    total, done_before, local = sum(f.size for f in files), 0, []
    with _hub_errors(repo, store):
        for remote in files:
            bars = None
            if progress is not None:
                base = done_before
                bars = _reporting_tqdm(lambda n, base=base: progress(base + n, total))
            path = Path(hf_hub_download(repo, remote.name, revision=revision, endpoint=_endpoint(), tqdm_class=bars))
            _verify(path, remote)
            local.append(path)
            done_before += remote.size
    return local


def pull_checkpoint(repo: str, listing: RepoListing, store: Store, keep_in: Path,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Download a safetensors repo's conversion files; return the folder that holds them.

    The files live in the Hub cache (so a second pull downloads nothing and a broken one resumes);
    ``keep_in/<repo name>`` links to them, so ``edgellm convert NAME`` finds them later.
    """
    store.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    size = sum(f.size for f in listing.checkpoint)
    if free < size * 2.1:  # the files, and a converted copy at most as large again (f32 -> f16 halves it)
        raise StorageError(f"not enough disk space for {size >> 20} MiB of {repo} and its conversion "
                           f"({free >> 20} MiB free)")
    local = _download(repo, listing.checkpoint, listing.commit or None, store, progress)
    folder = local[0].parent
    keep_in.mkdir(parents=True, exist_ok=True)
    link = keep_in / check_name(repo.split("/")[1].lower())
    tmp = keep_in / f".{link.name}.{os.getpid()}.link"
    tmp.unlink(missing_ok=True)
    os.symlink(folder, tmp, target_is_directory=True)
    os.replace(tmp, link)
    return link


def pull(
    ref: str, store: Store, name: str | None = None, revision: str | None = None,
    on_choice: Callable[[GGUFChoice, bool], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModelEntry:
    """Download REPO[:QUANT] into the store; ``on_choice(choice, was_default)`` hears the pick first,
    ``progress(bytes_done, bytes_total)`` follows the download (default: huggingface_hub's bars)."""
    repo, quant = parse_ref(ref)
    listing = list_repo(repo, revision, store)
    commit, choice = listing.commit, choose(listing.gguf, quant, repo)
    if on_choice:
        on_choice(choice, quant is None)
    model_name = check_name(name or f"{repo.split('/')[1].lower().removesuffix('-gguf')}-{choice.quant.lower()}")
    store.root.mkdir(parents=True, exist_ok=True)
    with exclusive(store.root / f".{model_name}.lock"):
        if store.exists(model_name):
            return store.get(model_name)
        free = shutil.disk_usage(store.root).free
        if free < choice.size * 1.05:
            raise StorageError(f"not enough disk space for {choice.size >> 20} MiB of {repo} ({free >> 20} MiB free)")
        local = _download(repo, choice.files, commit or revision, store, progress)

        def place(dest: Path) -> None:  # the first part takes the store's name; the others sit beside it
            for i, (path, remote) in enumerate(zip(local, choice.files)):
                target = dest if i == 0 else dest.parent / Path(remote.name).name
                try:
                    os.link(path.resolve(), target)
                except OSError:
                    shutil.copyfile(path, target)

        return store.create(model_name, Path(choice.files[0].name).name, f"hf:{repo}@{commit}:{choice.quant}", place,
                            expected_size=choice.size)


_HUB_NAME = re.compile(r"^(?:hf\.co|huggingface\.co)/([^/:]+/[^/:]+)(?::([^/:]+))?$", re.IGNORECASE)


def hub_name(name: str) -> tuple[str, str | None] | None:
    """(repo, quant or None) of a model named as Ollama names Hub models, ``hf.co/OWNER/REPO[:QUANT]``
    (``:latest`` is the default quant); None for any other name."""
    match = _HUB_NAME.match(name or "")
    if match is None:
        return None
    quant = match.group(2)
    repo, _ = parse_ref(match.group(1))
    return repo, (None if quant is None or quant.lower() == "latest" else quant.upper())


def pulled_name(store: Store, repo: str, quant: str | None = None) -> str | None:
    """The store name of the model pulled from ``repo`` (its ``quant``, or any quant), found by
    the source its manifest records; None if none was."""
    for entry in store.list():
        source = entry.manifest.source.lower()
        same_quant = quant is None or source.endswith(f":{quant.lower()}")
        if source.startswith(f"hf:{repo.lower()}@") and same_quant:
            return entry.name
    return None


def cached_copies(entry: ModelEntry) -> list[Path]:
    """The Hub cache's own copies of a pulled model's files: the blobs that are the same files (a
    pull hard-links them into the store) and the snapshot links to those blobs. Removing the model
    must remove them too, or its bytes stay on disk. Only exact links of the model's files are
    named, so nothing else in the cache is touched."""
    from huggingface_hub import constants

    source = entry.manifest.source  # untrusted (a copied folder's manifest): a repo id, or nothing
    match = re.match(r"^hf:([A-Za-z0-9][\w.-]*/[\w.-]+)@", source)
    if not match or ".." in match.group(1):
        return []
    repo_dir = Path(constants.HF_HUB_CACHE) / ("models--" + match.group(1).replace("/", "--"))
    ours = {(st.st_dev, st.st_ino) for f in entry.folder.iterdir()
            if f.is_file() and not f.is_symlink() and (st := f.stat()).st_nlink > 1}
    if not ours or not (repo_dir / "blobs").is_dir():
        return []
    blobs = [b for b in (repo_dir / "blobs").iterdir()
             if b.is_file() and not b.is_symlink() and (b.stat().st_dev, b.stat().st_ino) in ours]
    targets = {b.resolve() for b in blobs}
    links = [link for link in (repo_dir / "snapshots").rglob("*") if link.is_symlink() and link.resolve() in targets]
    return links + blobs


def _range(repo: str, file: str, revision: str | None, start: int, end: int, store: Store) -> bytes:
    """Bytes ``start..end`` (inclusive) of a repo file, by an HTTP range request."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo, file, revision=revision, endpoint=_endpoint())
    with _hub_errors(repo, store):
        resp = get_session().get(url, headers={**build_hf_headers(), "Range": f"bytes={start}-{end}"},
                                 follow_redirects=True)
        resp.raise_for_status()
    return resp.content


def remote_checkpoint(repo: str, listing: RepoListing, store: Store) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(config, tensor name -> shape) of a safetensors repo: config.json and each shard's header
    only (range requests, a few KB), so the planner can judge it before anything big moves."""
    import json

    names = {f.name: f for f in listing.checkpoint}
    if "config.json" not in names:
        raise ModelNotFoundError(f"{repo} has no config.json")
    try:
        config = json.loads(_range(repo, "config.json", listing.commit or None, 0, 1 << 20, store))
        shapes: dict[str, tuple[int, ...]] = {}
        for f in names.values():
            if not f.name.endswith(".safetensors"):
                continue
            n = int.from_bytes(_range(repo, f.name, listing.commit or None, 0, 7, store), "little")
            if not 0 < n <= min(100 << 20, f.size or n):
                raise ValueError(f"{f.name} has a header of {n} bytes")
            header = json.loads(_range(repo, f.name, listing.commit or None, 8, 8 + n - 1, store))
            shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    except (ValueError, KeyError, TypeError) as exc:
        raise HubError(f"{repo}: cannot read the checkpoint's config or safetensors headers: {exc}") from None
    from edgellm.convert.checkpoint import language_config

    return language_config(config), shapes


def remote_header(ref: str, store: Store, revision: str | None = None, probe_bytes: int = 4 << 20) -> tuple[GGUFChoice, GGUFHeader]:
    """The GGUF header of a remote model, read with range requests (a few MiB, never the weights)."""
    repo, quant = parse_ref(ref)
    listing = list_repo(repo, revision, store)
    choice = choose(listing.gguf, quant, repo)
    return choice, listed_header(repo, listing, choice, store, revision, probe_bytes)


#: headers read at a commit, which fixes a file's bytes: the app reads one to say which
#: quantizations fit, and again for the verdict before downloading the one picked
_HEADERS: dict[tuple, GGUFHeader] = {}
_HEADERS_KEPT = 8
_HEADERS_LOCK = threading.Lock()  # the app's workers read headers from two threads


def listed_header(repo: str, listing: RepoListing, choice: GGUFChoice, store: Store, revision: str | None = None,
                  probe_bytes: int = 4 << 20) -> GGUFHeader:
    """The header of one quantization of a repo already listed, read with range requests (once
    per file and commit)."""
    first = choice.files[0]
    key = (_endpoint(), repo, listing.commit, first.name, first.size, first.sha256)
    if listing.commit and (kept := _HEADERS.get(key)) is not None:  # one lookup: another thread may evict it
        return kept
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(first.name).name
        wanted = probe_bytes
        while True:
            path.write_bytes(_range(repo, first.name, listing.commit or revision, 0, wanted - 1, store))
            try:
                header = read_header(path, full_size=first.size)
                break
            except TruncatedGGUFError:
                if wanted >= first.size:
                    raise
                wanted *= 4  # the header is longer than we fetched (a big vocabulary): fetch more
    if listing.commit:
        with _HEADERS_LOCK:
            while len(_HEADERS) >= _HEADERS_KEPT:
                _HEADERS.pop(next(iter(_HEADERS)))  # the oldest
            _HEADERS[key] = header
    return header
