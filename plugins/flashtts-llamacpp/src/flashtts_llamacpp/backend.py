"""The ``llama-cpp`` backend: a GGUF copy of the TTS model's LLM on llama.cpp (CPU, or CUDA/Metal builds).

This module is the cheap half: it imports neither llama_cpp nor numpy, so that the registry can call
:meth:`LlamaCppBackend.check_available` and ``flashtts plugins`` stays fast. Everything that touches llama.cpp lives
in :mod:`flashtts_llamacpp._runtime`, imported in :meth:`LlamaCppBackend.startup`.

Flow of one request: ``generate`` (event loop) validates, queues a job for the runtime's worker threads (one per
llama.cpp context; by ``GenerationRequest.priority``, then FIFO) and then awaits an :class:`asyncio.Queue` that the
worker fills with ``loop.call_soon_threadsafe``. Closing or cancelling the consumer marks the job aborted; a waiting
job is dropped at once, a running one stops before its next token (or its next ``n_batch`` slice of the prompt).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

import anyio
import msgspec

from flashtts_core.errors import BackendNotReadyError
from flashtts_core.plugins import (
    BackendBase,
    BackendCapabilities,
    BackendConfig,
    BackendHealth,
    GenerationRequest,
    TokenChunk,
)
from flashtts_core.plugins.streams import token_stream
from flashtts_core.plugins.types import OPTIONAL_SAMPLING_FIELDS
from flashtts_llamacpp.options import LlamaCppOptions

if TYPE_CHECKING:
    from flashtts_llamacpp._runtime import LlamaCppRuntime

__all__ = ("LlamaCppBackend",)

logger = logging.getLogger(__name__)


class LlamaCppBackend(BackendBase):
    """llama-cpp-python ``Llama`` contexts driven token by token from worker threads.

    Honours every optional sampling field with Hugging Face semantics (numpy sampler, see ``_runtime``); seeds are per
    request, so a seeded request gives the same ids whatever else is queued. Requests run one per context
    (``--backend_option contexts=N``, default 1) and queue in arrival order beyond that.
    """

    name: ClassVar[str] = "llama-cpp"
    Options: ClassVar[type[msgspec.Struct]] = LlamaCppOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: LlamaCppOptions
        self._runtime: LlamaCppRuntime | None = None
        self._capabilities: BackendCapabilities | None = None

    @classmethod
    def check_available(cls) -> str | None:
        """find_spec only: importing llama_cpp loads its native library, and this runs on every ``flashtts plugins``."""
        if importlib.util.find_spec("llama_cpp") is None:
            return "pip install flashtts-llamacpp (llama-cpp-python builds from source; see README)"
        if importlib.util.find_spec("numpy") is None:
            return "the llama-cpp backend needs numpy: pip install numpy"
        return None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the GGUF into ``contexts`` llama.cpp contexts off the event loop and start their worker threads."""
        if self._started:
            return
        from flashtts_llamacpp._runtime import LlamaCppRuntime

        runtime = LlamaCppRuntime(self.config, self.options)
        try:
            await anyio.to_thread.run_sync(runtime.load)
        except BaseException:
            await anyio.to_thread.run_sync(runtime.close)
            raise
        self._runtime = runtime
        self._capabilities = BackendCapabilities(
            sampling=frozenset(OPTIONAL_SAMPLING_FIELDS),
            max_model_len=runtime.max_model_len,
            max_concurrency=runtime.num_contexts,
            deterministic_seed=True,
            devices=runtime.devices,
            vocab_size=runtime.n_vocab,
        )
        if self.config.dtype != "auto":
            logger.info(
                "llama-cpp backend: --torch_dtype %s ignored (the GGUF fixes the weight types)", self.config.dtype
            )
        logger.info(
            "llama-cpp backend ready: %s, max_model_len=%d, contexts=%d, n_threads=%d, n_gpu_layers=%d",
            runtime.gguf_path,
            runtime.max_model_len,
            runtime.num_contexts,
            runtime.n_threads,
            runtime.n_gpu_layers,
        )
        await super().startup()

    async def _shutdown(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await anyio.to_thread.run_sync(runtime.close)

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the llama-cpp backend is not started")
        return self._capabilities

    async def health(self) -> BackendHealth:
        """Counts come from the runtime: ``running`` is what the workers hold (including a just-cancelled request they
        have not dropped yet), ``waiting`` what is queued for a free context."""
        health = await super().health()
        runtime = self._runtime
        if runtime is None:
            return health
        return msgspec.structs.replace(health, running=runtime.num_running, waiting=runtime.num_waiting)

    # --- generation ------------------------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        runtime = self._runtime
        if runtime is None:
            raise BackendNotReadyError("the llama-cpp backend is not started")
        job = runtime.submit(request, asyncio.get_running_loop())
        try:
            async for chunk in token_stream(job.queue):
                yield chunk
        finally:
            runtime.abort(job)
