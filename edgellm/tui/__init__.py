"""The terminal app (Textual): the store's models, what they cost, and chat, in one place.

``make_app()`` is shared by the CLI (``edgellm`` / ``edgellm tui``) and the tests (Textual's Pilot).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgellm.config import Settings
    from edgellm.tui.app import EdgeApp


def make_app(settings: Settings | None = None) -> EdgeApp:
    from edgellm.config import Settings
    from edgellm.tui.app import EdgeApp

    return EdgeApp(settings or Settings.resolve())
