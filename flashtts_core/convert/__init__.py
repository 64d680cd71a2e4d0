"""Checkpoint converters: a model's Hugging Face LLM folder → the formats other runtimes load.

Only GGUF (llama.cpp) for now: ``flashtts convert-gguf MODEL_DIR``. The converter needs the optional ``gguf``
package (``pip install "flashtts-core[gguf]"``) and numpy; both are imported when a conversion runs, never when this
package is imported, so the CLI's ``--help`` stays light.
"""

from __future__ import annotations

from flashtts_core.convert.gguf import OUTTYPES, OutType, convert_to_gguf, find_llm_dir

__all__ = ("OUTTYPES", "OutType", "convert_to_gguf", "find_llm_dir")
