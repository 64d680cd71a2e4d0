"""MegaTTS3 engine (Whisper-style aligner, duration LM, latent DiT, WaveVAE decoder; Qwen2 G2P on the backend).

Exports are resolved lazily so that ``import flashtts_core.engines.mega`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ("MegaEngine", "MegaModels", "MegaOptions", "load_mega_models")

_LAZY = {
    "MegaEngine": "flashtts_core.engines.mega.engine",
    "MegaOptions": "flashtts_core.engines.mega.engine",
    "MegaModels": "flashtts_core.engines.mega.loading",
    "load_mega_models": "flashtts_core.engines.mega.loading",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
