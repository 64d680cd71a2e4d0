"""Messages between the torch backend and its worker process (msgpack frames over a socket pair).

Parent → worker: one :class:`Setup`, then :class:`Submit` / :class:`Abort` in any order, then :class:`Close`.
Worker → parent: :class:`Started` (it runs and can import this package), :class:`Ready` or :class:`Failed` (the
load), then one :class:`Step` per scheduler iteration that produced items or changed the counters, then
:class:`Closed`.

Requests are named by ``key``, an integer the parent assigns (request ids are the engine's and need not be unique).
No torch here: both sides import this module, the parent before it has decided to load torch at all.
"""

from __future__ import annotations

import msgspec

from flashtts_core.plugins import BackendConfig, GenerationRequest
from flashtts_torch.options import TorchOptions

__all__ = (
    "Abort",
    "Close",
    "Closed",
    "Failed",
    "Ready",
    "Setup",
    "Started",
    "Step",
    "StepItem",
    "Submit",
    "ToParent",
    "ToWorker",
)


class Setup(msgspec.Struct, frozen=True, tag=True):
    config: BackendConfig
    options: TorchOptions
    log_level: int


class Submit(msgspec.Struct, frozen=True, tag=True):
    key: int
    request: GenerationRequest


class Abort(msgspec.Struct, frozen=True, tag=True):
    key: int


class Close(msgspec.Struct, frozen=True, tag=True):
    pass


class Started(msgspec.Struct, frozen=True, tag=True):
    pass


class Ready(msgspec.Struct, frozen=True, tag=True):
    """What the backend reports and logs about the loaded model (see :class:`flashtts_torch._runtime.TorchRuntime`)."""

    device: str
    dtype: str
    vocab_size: int
    max_model_len: int
    cache_implementation: str
    cuda_graphs: bool
    path_description: str


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The load failed: the exception's class name (a :mod:`flashtts_core.errors` class is rebuilt as such)."""

    error_type: str
    message: str


class StepItem(msgspec.Struct, frozen=True, array_like=True):
    """One request's delta: ids and finish reason (a :class:`TokenChunk`), or the error that ended it."""

    key: int
    token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None


class Step(msgspec.Struct, frozen=True, tag=True):
    items: list[StepItem]
    running: int
    waiting: int
    peak_batch: int
    graphs_captured: int


class Closed(msgspec.Struct, frozen=True, tag=True):
    pass


ToWorker = Setup | Submit | Abort | Close
ToParent = Started | Ready | Failed | Step | Closed
