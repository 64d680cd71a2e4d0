"""The ``mlx-lm`` backend: Apple MLX through mlx-lm, with continuous batching in one worker thread.

This module is the cheap half: it must import without mlx so that the registry can call
:meth:`MlxBackend.check_available` and ``flashtts plugins`` stays fast. Everything that touches mlx lives in
:mod:`flashtts_mlx._runtime`, imported in :meth:`MlxBackend.startup`.

Flow of one request: ``generate`` (event loop) validates, submits the request to the runtime's worker thread and
awaits an :class:`asyncio.Queue` that the worker fills with ``loop.call_soon_threadsafe``. Closing or cancelling the
consumer marks the request aborted; the worker removes it from the batch before its next step.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import platform
from collections.abc import AsyncIterator
from pathlib import Path
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
from flashtts_mlx.options import MlxOptions

if TYPE_CHECKING:
    from flashtts_mlx._runtime import MlxRuntime

__all__ = ("SAMPLING_FIELDS", "MlxBackend")

logger = logging.getLogger(__name__)

#: Every optional sampling field: the runtime builds a sampler and logits processors per request.
SAMPLING_FIELDS: frozenset[str] = frozenset(
    {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "allowed_token_ids"}
)

_INSTALL = 'pip install flashtts-mlx (on Linux: pip install "mlx[cpu]" mlx-lm)'


def _mlx_problem() -> str | None:
    """Why mlx cannot be imported here, judged from the installed files only (importing mlx is what we avoid)."""
    spec = importlib.util.find_spec("mlx")
    if spec is None or importlib.util.find_spec("mlx_lm") is None:
        return f"the mlx-lm backend needs mlx and mlx-lm: {_INSTALL}"
    system = platform.system()
    if system == "Darwin" and platform.machine() != "arm64":
        return "mlx needs macOS on Apple silicon (arm64); on an Intel Mac use the torch or llama-cpp backend"
    if system not in ("Darwin", "Linux"):
        return f"mlx runs on macOS (Apple silicon) and Linux only, not on {system}"
    locations = [Path(p) for p in (spec.submodule_search_locations or ())]
    if not any(any(folder.glob("core.*")) for folder in locations if folder.is_dir()):
        # The mlx-cpu wheel alone installs only the native library, not the Python bindings.
        return f'mlx is installed without its Python bindings (mlx.core): pip install "mlx[cpu]" ({_INSTALL})'
    if system == "Linux" and not any((folder / "lib").glob("libmlx*") for folder in locations):
        return 'mlx has no native library on this Linux machine: pip install "mlx[cpu]" (or "mlx[cuda]")'
    return None


class MlxBackend(BackendBase):
    """mlx-lm ``BatchGenerator`` with a sampler, logits processors and stop ids per request.

    Honours every optional sampling field. Seeds are per request (each request's sampler holds its own PRNG key),
    so a seeded request gives the same ids whatever else is running.
    """

    name: ClassVar[str] = "mlx-lm"
    Options: ClassVar[type[msgspec.Struct]] = MlxOptions

    def __init__(self, config: BackendConfig) -> None:
        super().__init__(config)
        self.options: MlxOptions
        self._runtime: MlxRuntime | None = None
        self._capabilities: BackendCapabilities | None = None

    @classmethod
    def check_available(cls) -> str | None:
        """find_spec and file checks only: importing mlx/mlx-lm takes seconds and this runs for every
        ``flashtts plugins``."""
        return _mlx_problem()

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load the model in the worker thread and wait until it serves."""
        if self._started:
            return
        from flashtts_mlx._runtime import MlxRuntime

        if self.config.attn_implementation:
            # mlx-lm has one attention implementation (mx.fast.scaled_dot_product_attention).
            logger.debug("mlx-lm backend: attn_implementation=%r ignored", self.config.attn_implementation)
        runtime = MlxRuntime(self.config, self.options)
        try:
            await anyio.to_thread.run_sync(runtime.load)
        except BaseException:
            await anyio.to_thread.run_sync(runtime.close)
            raise
        self._runtime = runtime
        devices = {"cpu"}
        if platform.system() == "Darwin":
            devices.add("metal")
        self._capabilities = BackendCapabilities(
            sampling=SAMPLING_FIELDS,
            max_model_len=runtime.max_model_len,
            max_concurrency=None,
            deterministic_seed=True,
            devices=frozenset(devices),
            vocab_size=runtime.vocab_size,
        )
        logger.info(
            "mlx-lm backend ready: %s on %s, max_model_len=%d, max_batch_size=%d",
            self.config.model_dir,
            runtime.device_name,
            runtime.max_model_len,
            self.config.max_batch_size,
        )
        await super().startup()

    async def _shutdown(self) -> None:
        runtime, self._runtime = self._runtime, None
        if runtime is not None:
            await anyio.to_thread.run_sync(runtime.close)

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the mlx-lm backend is not started")
        return self._capabilities

    async def health(self) -> BackendHealth:
        """``running``: sequences in the generator (a just-cancelled one until the worker drops it); ``waiting``:
        queued for a free batch slot."""
        health = await super().health()
        runtime = self._runtime
        if runtime is None:
            return health
        return msgspec.structs.replace(health, running=runtime.num_running, waiting=runtime.num_waiting)

    # --- generation ------------------------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        runtime = self._runtime
        if runtime is None:
            raise BackendNotReadyError("the mlx-lm backend is not started")
        sequence = runtime.submit(request, asyncio.get_running_loop())
        try:
            async for chunk in token_stream(sequence.queue):
                yield chunk
        finally:
            runtime.abort(sequence)
