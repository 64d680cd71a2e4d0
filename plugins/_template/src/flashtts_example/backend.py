"""The example backend: a complete, contract-correct backend with no model behind it.

It "generates" by cycling through the prompt's ids, which is enough to show every obligation of a backend (and to
pass the conformance suite): validation before the first token (done by ``BackendBase.generate``), deltas, one
final chunk, stop ids and ``max_tokens``, cancellation and lifecycle. Replace the marked parts with your runtime.

Blocking runtimes (a C library, ``model.generate``) must not run on the event loop: run them in a worker thread and
hand ids back thread-safely (``loop.call_soon_threadsafe(queue.put_nowait, ...)`` or an anyio memory stream); on
cancellation set a flag the thread checks between tokens. ``flashtts-torch`` (``_runtime.py``) is a full example
with continuous batching.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator
from typing import Annotated, ClassVar

import anyio
import msgspec
from msgspec import Meta

from flashtts_core.errors import BackendNotReadyError, CheckpointError
from flashtts_core.plugins import BackendBase, BackendCapabilities, BackendConfig, GenerationRequest, TokenChunk

__all__ = ("ExampleBackend", "ExampleOptions")

logger = logging.getLogger(__name__)


class ExampleOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``--backend_option key=value`` settings. ``forbid_unknown_fields``: a typo must be an error, not ignored.
    Values arrive as strings from the CLI and are converted (``"0.01"`` → 0.01)."""

    # Pause between ids, standing in for the runtime's per-token work.
    token_delay_s: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0


class ExampleBackend(BackendBase):
    """Cycles through the prompt ids. ``name`` must equal the entry-point name in pyproject.toml."""

    name: ClassVar[str] = "example"
    Options: ClassVar[type[msgspec.Struct]] = ExampleOptions

    def __init__(self, config: BackendConfig) -> None:
        # Constructors only store and validate (options are converted by the base class): no I/O, no device work.
        super().__init__(config)
        self.options: ExampleOptions
        self._capabilities: BackendCapabilities | None = None

    @classmethod
    def check_available(cls) -> str | None:
        """Runs for every ``flashtts plugins``: find_spec only, never import the runtime here."""
        runtime_module = "json"  # replace with your runtime's import name, e.g. "llama_cpp"
        if importlib.util.find_spec(runtime_module) is None:
            return f"{runtime_module} is not installed: pip install flashtts-example"
        return None

    async def startup(self) -> None:
        """Load the model. Blocking loads go through ``anyio.to_thread.run_sync``."""
        model_dir = anyio.Path(self.config.model_dir)
        if not await model_dir.is_dir():
            raise CheckpointError(f"model_dir {self.config.model_dir} does not exist; pass a local model folder")
        # --- your runtime: import it here and load the weights (off the event loop) ---
        self._capabilities = BackendCapabilities(
            # Declare only the optional sampling fields you honour; requests using others are rejected up front
            # by BackendBase.validate. This backend samples nothing, so it declares none.
            sampling=frozenset(),
            max_model_len=self.config.max_model_len,
            max_concurrency=None,
            deterministic_seed=False,
        )
        await super().startup()  # marks the backend ready; last

    async def _shutdown(self) -> None:
        """Free the runtime. Called at most once per startup, also after a failed startup (check what exists)."""
        self._capabilities = None

    @property
    def capabilities(self) -> BackendCapabilities:
        if self._capabilities is None:
            raise BackendNotReadyError("the example backend is not started")
        return self._capabilities

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """``request`` is validated and its ``max_tokens`` fits the context. Yield deltas; end with exactly one
        chunk carrying the finish reason; never yield a stop id. If your runtime needs an explicit abort, call it
        in a ``finally`` here: it runs when the consumer closes the stream or its task is cancelled."""
        sampling = request.sampling
        stops = frozenset(sampling.stop_token_ids)
        prompt = request.prompt_token_ids
        for produced in range(sampling.max_tokens):
            await anyio.sleep(self.options.token_delay_s)  # a cancellation point between tokens
            token = prompt[produced % len(prompt)]  # --- your runtime's next id ---
            if token in stops:
                yield TokenChunk((), "stop")
                return
            if produced + 1 == sampling.max_tokens:
                yield TokenChunk((token,), "length")
                return
            yield TokenChunk((token,))
