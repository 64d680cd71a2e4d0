"""The HTTP server: a Litestar app built by :func:`create_app` (the only factory)."""

from __future__ import annotations

from flashtts_core.server.app import create_app

__all__ = ("create_app",)
