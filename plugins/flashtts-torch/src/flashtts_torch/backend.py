"""The ``torch`` backend: Hugging Face transformers models on CPU, CUDA or MPS, streamed per token.

This module is the cheap half: it must import without torch so that the registry can call
:meth:`TorchBackend.check_available` and ``flashtts plugins`` stays fast. Everything that touches torch lives in
:mod:`flashtts_torch._runtime`, imported in :meth:`TorchBackend.startup`.

Flow of one request: ``generate`` (event loop) validates, submits a sequence to the runtime's worker thread and then
awaits an :class:`asyncio.Queue` that the worker fills with ``loop.call_soon_threadsafe``. The worker batches every
active sequence into one forward pass per step (continuous batching, see ``_runtime``). Closing or cancelling the
consumer marks the sequence aborted; the worker drops it before its next step.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar

import anyio
import msgspec

from flashtts_core.errors import BackendNotReadyError, PromptTooLongError
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
from flashtts_torch.options import TorchOptions

if TYPE_CHECKING:
    from flashtts_torch._runtime import TorchRuntime

__all__ = ("TorchBackend",)

logger = logging.getLogger(__name__)


class TorchBackend(BackendBase):
    """transformers ``AutoModelForCausalLM`` with a hand-written KV-cache loop and continuous batching.

    Honours every optional sampling field with Hugging Face semantics, and seeds are per request (each sequence
    samples from its own ``torch.Generator``), so a seeded request gives the same ids whatever else is running.
    """

    name: ClassVar[str] = "torch"
    Options: ClassVar[type[msgspec.Struct]] = TorchOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: TorchOptions
        self._runtime: TorchRuntime | None = None
        self._capabilities: BackendCapabilities | None = None

    @classmethod
    def check_available(cls) -> str | None:
        """find_spec only: importing torch takes seconds and this runs for every ``flashtts plugins``."""
        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            return (
                f"the torch backend needs {' and '.join(missing)}: pip install flashtts-torch "
                "(for a CPU-only torch: pip install torch --index-url https://download.pytorch.org/whl/cpu)"
            )
        return None

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the model off the event loop and start the scheduler thread."""
        if self._started:
            return
        from flashtts_torch._runtime import TorchRuntime

        runtime = TorchRuntime(self.config, self.options)
        try:
            await anyio.to_thread.run_sync(runtime.load)
        except BaseException:
            await anyio.to_thread.run_sync(runtime.close)
            raise
        self._runtime = runtime
        self._capabilities = BackendCapabilities(
            sampling=frozenset(OPTIONAL_SAMPLING_FIELDS),
            max_model_len=runtime.max_model_len,
            max_concurrency=None,
            deterministic_seed=True,
            devices=frozenset({"cpu", "cuda", "mps"}),
            vocab_size=runtime.vocab_size,
        )
        logger.info(
            "torch backend ready: %s on %s (%s), max_model_len=%d, max_batch_size=%d; decoding path: %s",
            self.config.model_dir,
            runtime.device,
            runtime.dtype,
            runtime.max_model_len,
            self.config.max_batch_size,
            runtime.path_description,
        )
        await super().startup()

    async def _shutdown(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await anyio.to_thread.run_sync(runtime.close)

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the torch backend is not started")
        return self._capabilities

    async def health(self) -> BackendHealth:
        """Counts come from the worker: ``running`` is what it holds (including a just-cancelled sequence it has
        not dropped yet), ``waiting`` what is queued for a free batch slot."""
        health = await super().health()
        runtime = self._runtime
        if runtime is None:
            return health
        return msgspec.structs.replace(health, running=runtime.num_running, waiting=runtime.num_waiting)

    # --- generation ------------------------------------------------------------------------------------------

    def validate(self, request: GenerationRequest) -> GenerationRequest:
        """:meth:`BackendBase.validate`, with a message that names the static cache when it is what limits the
        context (its ``static_cache_len`` columns, not ``--max_length``)."""
        runtime = self._runtime
        if (
            runtime is not None
            and self._started
            and runtime.cache_implementation == "static"
            and len(request.prompt_token_ids) >= runtime.max_model_len
        ):
            raise PromptTooLongError(
                f"the prompt has {len(request.prompt_token_ids)} tokens but the static KV cache of the torch backend "
                f"holds {runtime.max_model_len} (prompt + generated); shorten the text (or split it) or raise "
                "--backend_option static_cache_len (or --max_length, which caps it)",
                param="input",
            )
        return super().validate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        runtime = self._runtime
        if runtime is None:
            raise BackendNotReadyError("the torch backend is not started")
        sequence = runtime.submit(request, asyncio.get_running_loop())
        try:
            async for chunk in token_stream(sequence.queue):
                yield chunk
        finally:
            runtime.abort(sequence)
