"""Orpheus-TTS engine (Llama-3 LLM + SNAC 24 kHz decoder).

Exports are resolved lazily so that ``import flashtts_core.engines.orpheus`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ("LANG_MAP", "OrpheusEngine", "OrpheusOptions", "OrpheusTokens", "SnacDecoder")

_LAZY = {
    "LANG_MAP": "flashtts_core.engines.orpheus.languages",
    "OrpheusEngine": "flashtts_core.engines.orpheus.engine",
    "OrpheusOptions": "flashtts_core.engines.orpheus.engine",
    "OrpheusTokens": "flashtts_core.engines.orpheus.tokens",
    "SnacDecoder": "flashtts_core.engines.orpheus.snac",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
