"""``--backend_option key=value`` settings of the llama-cpp backend (``--llm_gguf PATH`` sets ``gguf``)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ("LlamaCppOptions",)


class LlamaCppOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Backend-specific options; unknown keys are an error naming the known ones (typos must not pass silently)."""

    # The GGUF file to load. Unset: <model_dir>/model.gguf, else the only *.gguf in the LLM folder (or its LLM/).
    gguf: str | None = None
    # CPU threads for decoding and prompt evaluation. Unset: the physical cores this process may use (llama.cpp gains
    # nothing from hyper-threads, and oversubscribed spin-waiting threads collapse throughput on shared machines).
    n_threads: Annotated[int, Meta(ge=1, le=1024)] | None = None
    # Layers offloaded to the GPU. Unset: all (-1) when the device is not "cpu" and this llama.cpp build has a GPU
    # backend (CUDA, Metal, ...), else 0.
    n_gpu_layers: Annotated[int, Meta(ge=-1)] | None = None
    # Prompt tokens evaluated per llama_decode call (llama.cpp's n_batch); cancellation is checked between batches.
    n_batch: Annotated[int, Meta(ge=1, le=65536)] = 512
    # Independent llama.cpp contexts (each with its own KV cache and worker thread), capped at --llm_batch_size.
    # 1 serves requests one at a time in arrival order. More only pays off when each context has its own cores or
    # a GPU; on the GPU every context uploads its own copy of the weights (on the CPU they share the mmapped file).
    contexts: Annotated[int, Meta(ge=1, le=256)] = 1
    # Keep the KV cache of a context's previous request and evaluate only the part of the next prompt that differs
    # (Spark prompts of one voice share long prefixes). Off: every prompt is evaluated from scratch.
    prefix_cache: bool = True
