"""Spark-TTS engine (BiCodec audio tokenizer + Qwen2 LLM).

Exports are resolved lazily so that ``import flashtts_core.engines.spark`` stays cheap (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ("BiCodec", "SparkEngine")

_LAZY = {
    "BiCodec": "flashtts_core.engines.spark.bicodec",
    "SparkEngine": "flashtts_core.engines.spark.engine",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
