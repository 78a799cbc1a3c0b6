"""Retouch: a self-hostable server for the qwen-image-edit async task API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retouch.client import AsyncClient, Client

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client", "__version__"]


def __getattr__(name: str) -> Any:
    """`Client` and `AsyncClient` load on first use: `import retouch` stays light."""
    if name in ("Client", "AsyncClient"):
        from retouch import client

        return getattr(client, name)
    raise AttributeError(f"module 'retouch' has no attribute {name!r}")
