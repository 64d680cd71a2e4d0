"""Shared helpers of the engine tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from flashtts_core.plugins import GenerationRequest, TokenChunk


def record_priorities(engine: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Pass every generation of ``engine`` through to its real backend, recording ``GenerationRequest.priority``."""
    backend = engine.backend
    real = backend.generate
    priorities: list[int] = []

    def generate(request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        priorities.append(request.priority)
        return real(request)

    monkeypatch.setattr(backend, "generate", generate)
    return priorities
