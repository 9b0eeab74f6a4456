"""A local OpenAI-compatible server with continuous batching (``edgellm serve``)."""

from edgellm.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
