"""GGUF copies of the tiny test checkpoints, for llama.cpp-based backends.

The tiny Hugging Face checkpoints (:mod:`flashtts_core.testing.tiny_llm`) are converted with the same converter users
run (``flashtts convert-gguf``), so every llama.cpp test also exercises the converter. f32 is the default because the
backend tests compare llama.cpp's output with transformers' on random weights, where f16 rounding can flip a
near-tie in greedy decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flashtts_core.convert.gguf import OutType, convert_to_gguf

__all__ = ("build_tiny_gguf",)

logger = logging.getLogger(__name__)


def build_tiny_gguf(hf_dir: Path | str, out_path: Path | str, outtype: OutType = "f32") -> Path:
    """Convert the tiny checkpoint (or model root) ``hf_dir`` to the GGUF file ``out_path`` and return the path.

    Needs the ``gguf`` package. Takes well under a second for the tiny models (about a second for the Spark LLM
    with its 13.5k added tokens), so tests build into ``tmp_path`` instead of a shared cache.
    """
    return convert_to_gguf(hf_dir, out_path, outtype=outtype)
