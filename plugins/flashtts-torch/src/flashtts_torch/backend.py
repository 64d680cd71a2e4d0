"""The ``torch`` backend: Hugging Face transformers models on CPU, CUDA or MPS, streamed per token.

This module is the cheap half: it must import without torch so that the registry can call
:meth:`TorchBackend.check_available` and ``flashtts plugins`` stays fast. Everything that touches torch lives in
:mod:`flashtts_torch._runtime`, imported in :meth:`TorchBackend.startup`.

Flow of one request: ``generate`` (event loop) validates, submits a sequence to the runtime's worker thread and then
awaits an :class:`asyncio.Queue` that the worker fills with ``loop.call_soon_threadsafe``. The worker batches every
active sequence into one forward pass per step (continuous batching, see ``_runtime``). Closing or cancelling the
consumer marks the sequence aborted; the worker drops it before its next step.

Where the runtime lives (option ``worker``): a thread of this process (:class:`~flashtts_torch._runtime.TorchRuntime`)
or a worker process (:class:`~flashtts_torch._process.ProcessRuntime`, the default on the CPU), which keeps the
decoding loop off the server's interpreter lock; both fill the same queues, so the flow above holds for either.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import platform
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, ClassVar, TypeVar

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
    from flashtts_torch._process import ProcessRuntime
    from flashtts_torch._runtime import TorchRuntime

__all__ = ("TorchBackend",)

_Runtime = TypeVar("_Runtime", "TorchRuntime", "ProcessRuntime")

logger = logging.getLogger(__name__)


def _means_cpu(device: str) -> bool:
    """Whether ``device`` puts the model on the CPU, decided without importing torch (seconds that the worker process
    would otherwise wait for): ``auto`` is the CPU on a machine without an NVIDIA or AMD GPU driver that is not an
    Apple Silicon Mac. Where this guesses the CPU and torch finds a GPU after all, the worker runs on that GPU."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return False  # MPS
    return not any(os.path.exists(path) for path in ("/proc/driver/nvidia", "/dev/nvidia0", "/dev/kfd"))


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
        self._runtime: TorchRuntime | ProcessRuntime | None = None
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
        """Load the model off the event loop and start the scheduler (in a thread, or in the worker process)."""
        if self._started:
            return
        runtime: TorchRuntime | ProcessRuntime
        if self.worker_mode() == "process":
            from flashtts_torch._process import ProcessRuntime, WorkerStartError

            try:
                runtime = await self._load(ProcessRuntime(self.config, self.options))
            except WorkerStartError as exc:
                if self.options.worker == "process":
                    raise
                # auto: an environment that cannot run the worker still serves, with the scheduler in a thread.
                logger.warning("%s; the torch backend decodes in a thread of the server instead", exc.message)
                runtime = await self._load(self._thread_runtime())
        else:
            runtime = await self._load(self._thread_runtime())
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

    def _thread_runtime(self) -> TorchRuntime:
        from flashtts_torch._runtime import TorchRuntime

        return TorchRuntime(self.config, self.options)

    @staticmethod
    async def _load(runtime: _Runtime) -> _Runtime:
        """Load ``runtime`` off the event loop; close it again if that fails."""
        try:
            await anyio.to_thread.run_sync(runtime.load)
        except BaseException:
            await anyio.to_thread.run_sync(runtime.close)
            raise
        return runtime

    @property
    def loads_out_of_process(self) -> bool:
        """True with the worker process: the server loads the engine's codec while the worker loads the LLM."""
        return self.worker_mode() == "process"

    def worker_mode(self) -> str:
        """``thread`` or ``process`` (option ``worker``; auto: a process for CPU decoding on POSIX systems)."""
        mode = self.options.worker or "auto"
        if mode != "auto":
            return mode
        if os.name != "posix" or getattr(sys, "frozen", False):  # a frozen app's executable is not a Python
            return "thread"
        return "process" if _means_cpu(self.config.device) else "thread"

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
        failure = getattr(runtime, "failure", None)
        if failure is not None:
            return msgspec.structs.replace(health, status="degraded", detail=f"torch backend: {failure}")
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
